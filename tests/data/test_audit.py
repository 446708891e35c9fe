"""`tunelab data check`: each finding on fixtures built for it, and on the real banking77 file."""

from __future__ import annotations

import json

import pytest

from tests.conftest import shared_file, write_jsonl
from tunelab.cli import main
from tunelab.config import DataConfig
from tunelab.data.audit import audit
from tunelab.data.render import RenderSpec

LONG = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
TRAIN = [
    {"prompt": "What colour is the sky?", "completion": " blue"},            # 0 exact duplicate of 1
    {"prompt": "What colour is the sky?", "completion": " blue"},            # 1
    {"prompt": LONG + " sixteen", "completion": " numbers"},                   # 2 near duplicate of 3
    {"prompt": LONG + " seventeen", "completion": " numbers"},                 # 3
    {"prompt": "Is fire hot?", "completion": " yes"},                         # 4 conflicts with 5
    {"prompt": "Is fire hot?", "completion": " no"},                          # 5
    {"prompt": "Name a fruit that is yellow.", "completion": " banana"},       # 6 leaks into eval
    {"prompt": "word " * 80, "completion": " long"},                          # 7 truncated at max_length 96
    {"prompt": "What is two plus two?", "completion": "   "},                # 8 empty target
    {"prompt": "Where do fish live?", "completion": " in water"},              # 9 clean
]
EVAL = [{"prompt": "Name a fruit that is yellow.", "completion": " banana"}, {"prompt": "Unseen?", "completion": " x"}]


@pytest.fixture()
def files(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", TRAIN), write_jsonl(tmp_path / "eval.jsonl", EVAL)


def test_each_finding_names_its_rows(files, tokenizer):
    train, evals = files
    r = audit(str(train), DataConfig(train=str(train), max_length=96), RenderSpec(), tokenizer, str(evals))
    assert r["exact_duplicates"]["groups"] == [[0, 1]]
    assert r["near_duplicates"]["groups"] == [[2, 3]]
    assert r["conflicts"]["groups"] == [[4, 5]]
    assert r["leakage"]["indices"] == [6] and r["leakage"]["pairs"] == [{"train_row": 6, "eval_row": 0}]
    assert r["truncated"]["indices"] == [7] and r["truncated"]["prompt_cut"] == [7]
    assert r["empty_targets"]["indices"] == [8]
    assert r["blocking"] == ["empty_targets"]
    assert r["num_records"] == 10 and r["num_examples"] == 9
    assert r["missing_eos"]["count"] == 0
    item = r["preview"][0]
    assert "".join(t for t, trained in item["tokens"] if trained).strip() == "blue</s>"


def test_missing_eos_in_pretokenized_data(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt_ids": [1, 5, 6], "completion_ids": [7, 2]},
                                              {"prompt_ids": [1, 5, 9], "completion_ids": [7, 8]}])
    r = audit(str(path), DataConfig(train=str(path)), RenderSpec(), tokenizer)
    assert r["missing_eos"]["indices"] == [1]


def test_chat_targets_ending_in_eos_are_not_missing_it(tmp_path, tokenizer):
    # the fallback chat template writes a newline after each assistant turn's EOS: the example's last token is
    # masked, and its last trained token is EOS
    rows = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}"}]}
            for i in range(3)]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    r = audit(str(path), DataConfig(train=str(path)), RenderSpec(), tokenizer)
    tokens = r["preview"][0]["tokens"]
    assert not tokens[-1][1] and [t for t, trained in tokens if trained][-1] == tokenizer.eos_token
    assert r["missing_eos"]["count"] == 0


def test_cli_exit_codes_and_fix(files, stories260k, tmp_path, capsys, monkeypatch):
    train, evals = files
    monkeypatch.chdir(tmp_path)  # without --output, a data file's report goes to the working directory
    before = train.read_text()
    out = tmp_path / "check.json"
    code = main(["data", "check", str(train), "--model", str(stories260k), "--eval", str(evals), "--max-length", "96",
                 "--output", str(out), "--fix", str(tmp_path / "clean.jsonl")])
    printed = capsys.readouterr().out
    assert code == 1 and "[blocking] empty_targets: 1 rows" in printed
    check = json.loads(out.read_text())
    for key in ("exact_duplicates", "near_duplicates", "conflicts", "leakage", "truncated", "empty_targets"):
        assert {"count", "indices", "severity"} <= set(check[key])
    assert train.read_text() == before  # the original is never touched
    clean = [json.loads(line) for line in (tmp_path / "clean.jsonl").read_text().splitlines()]
    # dropped: 1 (duplicate of 0), 3 (near duplicate of 2), 4 and 5 (conflict), 6 (leak), 8 (empty)
    assert clean == [TRAIN[i] for i in (0, 2, 7, 9)]
    assert main(["data", "check", str(tmp_path / "clean.jsonl"), "--model", str(stories260k), "--eval", str(evals),
                 "--max-length", "96"]) == 0
    html = (tmp_path / "data-check.html").read_text()
    assert "clean.jsonl" in html and "<mark>" in html and "data:image/png;base64," in html


def test_banking77_duplicates_and_balance(tokenizer):
    path = str(shared_file("banking77/train.csv"))
    cfg = DataConfig(train=path, columns={"label": "category"}, max_length=128)
    r = audit(path, cfg, RenderSpec(), tokenizer, str(shared_file("banking77/test.csv")), preview=0)
    # Found in banking77 as published (train.csv 10,003 rows, test.csv 3,080), near threshold 0.8:
    # 4 groups of exact duplicates (8 rows, e.g. rows 1246 and 1290 differ only in surrounding newlines),
    # 58 groups of near duplicates (123 rows, e.g. "an extra £1 charge" / "an extra €1 charge"),
    # 3 conflicting groups ("Has my top up gone through?" pending_top_up vs "top-up" top_up_reverted),
    # and 57 test questions that also appear, exactly or nearly, in train (59 train rows).
    assert r["num_examples"] == 10003
    assert len(r["label_balance"]["counts"]) == 77
    assert (len(r["exact_duplicates"]["groups"]), r["exact_duplicates"]["count"]) == (4, 8)
    assert [1246, 1290] in r["exact_duplicates"]["groups"]
    assert (len(r["near_duplicates"]["groups"]), r["near_duplicates"]["count"]) == (58, 123)
    assert r["conflicts"]["groups"][0] == [2002, 3160]
    assert len(r["conflicts"]["groups"]) == 3
    assert len({p["eval_row"] for p in r["leakage"]["pairs"]}) == 57 and r["leakage"]["count"] == 59


def test_a_config_check_audits_each_file_of_a_mixture_says_its_share_and_warms_the_cache(tmp_path, stories260k,
                                                                                          capsys):
    import yaml

    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"Question {i}?", "completion": f" answer {i}"} for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"question": f"Other {i}?", "answer": f" reply {i}"} for i in range(10)]
                    + [{"question": "Other 0?", "answer": " reply 0"}])  # an exact duplicate, in b only
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(stories260k)}, "output_dir": str(tmp_path / "run"), "train": {"max_steps": 1},
        "data": {"train": [{"path": str(a), "weight": 1}, {"path": str(b), "weight": 3,
                                                           "columns": {"prompt": "question", "completion": "answer"}}],
                 "cache_dir": str(tmp_path / "cache")}}))
    out = tmp_path / "check.json"
    assert main(["data", "check", str(config), "--output", str(out)]) == 0
    printed = capsys.readouterr()
    result = json.loads(out.read_text())
    assert [s["train"] for s in result["sources"]] == [str(a), str(b)]
    assert [s["num_examples"] for s in result["sources"]] == [30, 11]
    assert result["sources"][0]["exact_duplicates"]["groups"] == []
    assert result["sources"][1]["exact_duplicates"]["groups"] == [[0, 10]]
    assert result["shares"] == {str(a): 10, str(b): 31}  # 41 examples an epoch: a quarter and three quarters
    assert f"{a}: 10 examples an epoch (24.4%)" in printed.out and f"{b}: 31 examples an epoch (75.6%)" in printed.out
    assert "cached for the next run" in printed.err
    assert main(["data", "check", str(config)]) == 0  # the second check (and a train) reads the encoded rows
    assert "(cache hit)" in capsys.readouterr().err
