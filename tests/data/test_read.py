"""Every file type reads into the same records; eval splits are seeded."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import shared_file
from tunelab.config import DataConfig
from tunelab.data.dataset import split_eval
from tunelab.data.read import read_records
from tunelab.data.records import to_examples
from tunelab.errors import DataError

ROWS = [{"prompt": "a, \"quoted\" prompt", "completion": " one"}, {"prompt": "b", "completion": " two"}]


def _write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".tsv":  # TSV: no quoting, a quote is a plain character
        path.write_text("".join("\t".join(r.values()) + "\n" for r in [dict(zip(rows[0], rows[0])), *rows]))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_every_file_type_reads_the_same(tmp_path, suffix):
    records = read_records(_write(tmp_path / f"d{suffix}", ROWS))
    assert [r.fields for r in records] == ROWS
    assert [r.row for r in records] == [0, 1]


def test_real_files_read(tmp_path):
    b77 = to_examples(read_records(shared_file("banking77/train.csv")), columns={"label": "category"})
    assert len(b77) == 10003 and b77[0].shape == "text_label" and b77[0].fields["label"] == "card_arrival"
    gsm = to_examples(read_records(shared_file("gsm8k/test.jsonl")), columns={"prompt": "question", "completion": "answer"})
    assert len(gsm) == 1319 and "####" in gsm[0].target
    sms = to_examples(read_records(shared_file("sms_spam/SMSSpamCollection.tsv"), column_names=["label", "text"]))
    assert len(sms) == 5574 and sms[0].shape == "text_label"
    assert sum(e.fields["label"] == "spam" for e in sms) == 747  # the UCI collection's spam count


def test_eval_fraction_split_is_seeded_and_disjoint(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": str(i), "completion": f" {i}"} for i in range(100)])
    examples = to_examples(read_records(path))
    train, evals = split_eval(examples, 0.2, seed=7)
    assert len(train) == 80 and len(evals) == 20
    assert not {e.source for e in train} & {e.source for e in evals}
    again = split_eval(examples, 0.2, seed=7)[1]
    assert [e.source for e in again] == [e.source for e in evals]
    assert [e.source for e in split_eval(examples, 0.2, seed=8)[1]] != [e.source for e in evals]


def test_malformed_lines_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: this line is not valid JSON"):
        read_records(path)
    path.write_text('{"prompt": "a", "completion": "b"}\n\n["a list"]\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: expected a JSON object"):
        read_records(path)
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: this line is not valid JSON"):
        read_records(path)
    path = tmp_path / "bad.csv"
    path.write_text('prompt,completion\na,b\nc,d,e\n')
    with pytest.raises(DataError, match=r"bad.csv:3: this row has more fields"):
        read_records(path)
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(DataError, match="suffix '.txt'"):
        read_records(tmp_path / "x.txt")


def test_data_config_defaults():
    cfg = DataConfig(train="x.jsonl")
    assert (cfg.format, cfg.truncation, cfg.render) == ("auto", "left", "auto")
