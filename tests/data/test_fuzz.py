"""Fuzzed files through the data reader, the record-shape detection and the config loader.

Thousands of inputs (valid files mutated by truncation, byte flips, insertions and deletions; records
of wrong types, deep nesting, huge and empty values; Parquet columns of every common type; YAML
configs) must either load or stop with a DataError / ConfigError whose message names the file (for a
bad override, the override): never another exception, which the CLI would print as a traceback.
Derandomized, so a failure repeats; no model is needed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tunelab.config import load_config  # noqa: E402
from tunelab.data.read import read_records  # noqa: E402
from tunelab.data.records import SHAPES, to_examples  # noqa: E402
from tunelab.errors import ConfigError, DataError  # noqa: E402


def fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


FIELDS = sorted({f for req, opt, _ in SHAPES.values() for f in req + opt} | {"role", "content", "id", ""})
VALID = [
    {"prompt": "What colour is the sky?", "completion": " blue"},
    {"text": "I lost my card", "label": "lost_card"},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    {"instruction": "Add", "input": "2 and 2", "output": "4"},
    {"prompt_ids": [1, 5, 6], "completion_ids": [7, 2]},
]
# no subnormals: an in-process `tunelab train` (earlier tests) sets torch's flush-denormal mode for the whole process,
# and hypothesis refuses to generate subnormal floats under it
FLOATS = st.floats(allow_subnormal=False)
HUGE = "x" * 140_000  # over the csv module's default field limit of 128 KiB
DEEP = "[" * 3000 + "]" * 3000  # deeper than Python's recursion limit

leaf = (st.none() | st.booleans() | st.integers() | FLOATS | st.text(max_size=12)
        | st.sampled_from(["", " ", "\ud83d", "\x00", HUGE, "user", "assistant", "system"]))
value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=4), inner, max_size=3), max_leaves=10)
message = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "system", "bot"]) | value,
                                              "content": value})
record = st.dictionaries(st.sampled_from(FIELDS), value | st.lists(message, max_size=3), max_size=5)


INSERTS = [b"\xff", b"\xe9", b"\x00", b"\n", b'"', b",", b"\t", b"{", b"[", b"\xef\xbb\xbf"]


@st.composite
def mutation(draw: Any, data: bytes, inserts: list[bytes] = INSERTS + [DEEP.encode()]) -> bytes:
    """`data` cut short, with bytes flipped, inserted or deleted, or lines duplicated."""
    out = bytearray(data)
    for op in draw(st.lists(st.sampled_from(["cut", "flip", "insert", "delete", "dup"]), min_size=1, max_size=4)):
        at = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "cut":
            del out[at:]
        elif op == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(inserts))
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 16))]
        elif op == "dup":
            out += out[at:]
    return bytes(out)


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _csv(rows: list[dict[str, Any]], sep: str = ",") -> bytes:
    return ("prompt" + sep + "completion\n" + "".join(f"q{i}{sep}a {i}\n" for i in range(len(rows)))).encode()


SEEDS = {".jsonl": _jsonl(VALID), ".json": json.dumps(VALID).encode(), ".csv": _csv(VALID), ".tsv": _csv(VALID, "\t")}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def reads_or_refuses(path: Path, column_names: list[str] | None = None) -> None:
    """read_records and to_examples (every data.format, and a column mapping) load `path`, or raise a
    DataError that names it; any other exception fails the test."""
    try:
        records = read_records(path, column_names)
    except DataError as exc:
        assert str(path) in str(exc), str(exc)
        return
    calls = [(s, None, None) for s in ("auto", *SHAPES)] + [("auto", {"label": "completion"}, None), ("auto", None, [])]
    for shape, columns, collect in calls:  # every shape; a column mapping; empty targets collected, not raised
        try:
            to_examples(records, shape, columns, empty_targets=collect)
        except DataError as exc:
            assert str(path) in str(exc), str(exc)


@fuzz(1000)
@given(suffix=st.sampled_from(sorted(SEEDS)), data=st.data())
def test_mutated_text_files_load_or_name_the_file(folder, suffix, data):
    path = folder / f"mutated{suffix}"
    path.write_bytes(data.draw(mutation(SEEDS[suffix])))
    header_less = suffix in (".csv", ".tsv") and data.draw(st.booleans())
    reads_or_refuses(path, ["prompt", "completion"] if header_less else None)


@fuzz(400)
@given(suffix=st.sampled_from([".jsonl", ".json", ".csv"]), rows=st.lists(record, max_size=4))
def test_records_of_any_shape_and_type_load_or_name_the_file(folder, suffix, rows):
    path = folder / f"records{suffix}"
    if suffix == ".csv":  # every value is text in a CSV: the fuzz is in the columns and the quoting
        import csv

        buf = io.StringIO()
        names = sorted({k for r in rows for k in r})
        writer = csv.DictWriter(buf, fieldnames=names)
        writer.writeheader()
        writer.writerows([{k: str(v) for k, v in r.items()} for r in rows])
        path.write_text(buf.getvalue() if names else "", encoding="utf-8", errors="surrogatepass")
    else:
        text = json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows)
        path.write_text(text)
    reads_or_refuses(path)


def _parquet_column(kind: str) -> Any:
    import pyarrow as pa

    return {
        "string": (st.text(max_size=8) | st.none() | st.just(HUGE), pa.string()),
        "int": (st.integers(-(2**63), 2**63 - 1) | st.none(), pa.int64()),
        "float": (FLOATS | st.none(), pa.float64()),
        "bool": (st.booleans(), pa.bool_()),
        "list": (st.lists(st.integers(-5, 600), max_size=4), pa.list_(pa.int64())),
        "messages": (st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "x"]),
                                                      "content": st.text(max_size=6)}), max_size=3),
                     pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        "binary": (st.binary(max_size=8), pa.binary()),
        "timestamp": (st.datetimes(), pa.timestamp("us")),
    }[kind]


@st.composite
def parquet_bytes(draw: Any) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = draw(st.integers(0, 4))
    names = draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=4))
    columns = {}
    for name in names:
        values, kind = _parquet_column(draw(st.sampled_from(["string", "int", "float", "bool", "list", "messages",
                                                             "binary", "timestamp"])))
        columns[name] = pa.array(draw(st.lists(values, min_size=n, max_size=n)), type=kind)
    buf = io.BytesIO()
    pq.write_table(pa.table(columns) if columns else pa.table({"text": pa.array([], pa.string())}), buf)
    return buf.getvalue()


@fuzz(300)
@given(data=st.data())
def test_parquet_of_any_column_types_or_damage_loads_or_names_the_file(folder, data):
    raw = data.draw(parquet_bytes())
    if data.draw(st.booleans()):
        raw = data.draw(mutation(raw))
    path = folder / "table.parquet"
    path.write_bytes(raw)
    reads_or_refuses(path)


CONFIG = yaml.safe_dump({"model": {"path": "/models/m"}, "data": {"train": "t.jsonl", "max_length": 64},
                         "strategy": {"name": "lora", "lora": {"rank": 4}}, "train": {"max_steps": 3},
                         "output_dir": "runs/x"}).encode()
KEYS = ["model", "data", "strategy", "train", "output_dir", "path", "train", "max_length", "name", "lora", "rank",
        "max_steps", "columns", "template", "prompt", "learning_rate", "eval_fraction", "resume", ""]
config_leaf = (st.none() | st.booleans() | st.integers() | FLOATS | st.text(max_size=12)
               | st.sampled_from(["", "\ud83d", "\x00", "x" * 2000, "full", "lora", "auto"]))
config_tree = st.dictionaries(st.sampled_from(KEYS), st.recursive(
    config_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    max_leaves=12), max_size=6)
# appended to a valid config, or (None) the whole file
YAML_SNIPPETS = [b"a: !!python/object:os.system x\n", b"d: 2024-13-45\n", b"&a [*a]\n", b"x: *nope\n",
                 b"n: " + b"9" * 5000 + b"\n", b"\xff\xfe", b"? [a, b]\n: c\n", b"- a\n- b\n", b"model:\n  path:\n"]


def loads_or_refuses(path: Path, overrides: list[str] = ()) -> None:
    try:
        load_config(path, overrides)
    except ConfigError as exc:
        assert str(path) in str(exc) or any(o in str(exc) for o in overrides), str(exc)


YAML_DEEP = b"[" * 700 + b"]" * 700  # past PyYAML's recursion (600 is enough), cheaper than DEEP


@pytest.mark.parametrize("snippet", YAML_SNIPPETS + [YAML_DEEP, b"a: " + YAML_DEEP])
def test_yaml_that_python_cannot_build_names_the_file(folder, snippet):
    path = folder / "snippet.yaml"
    path.write_bytes(snippet if snippet.startswith((b"[", b"a: [")) else CONFIG + snippet)
    loads_or_refuses(path)


@fuzz(600)
@given(data=st.data())
def test_configs_load_or_name_the_file(folder, data):
    path = folder / "config.yaml"
    if data.draw(st.booleans()):
        raw = data.draw(mutation(CONFIG, INSERTS + [b": ", b"- ", b"&a ", b"*a", b"!!", b"? "]))
    else:
        raw = yaml.safe_dump(data.draw(config_tree), allow_unicode=True).encode("utf-8", "surrogatepass")
    path.write_bytes(raw)
    overrides = data.draw(st.lists(st.sampled_from(["train.max_steps=", "data.columns=", "model=", "a..b=", "=1",
                                                    "x", "train.max_steps.x=1", "strategy.lora.rank=[1"])
                                   .flatmap(lambda k: st.text(max_size=6).map(lambda v: k + v)), max_size=2))
    loads_or_refuses(path, overrides)
