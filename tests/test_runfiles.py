"""tunelab.runfiles owns a run directory's layout: no other module names a run file, non-finite metrics survive
the writer and the reader, rows are read by kind, and the strategy that saved a model is read from the run."""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import pytest

from tests.conftest import VARIED_ROWS, config_tree, write_jsonl
from tunelab import runfiles
from tunelab.config import validate_config
from tunelab.train.metrics import MetricsWriter

PACKAGE = Path(__file__).resolve().parents[1] / "tunelab"
# the files whose names only tunelab.runfiles may write down
RUN_FILE_NAME = re.compile(r"\b(metrics\.jsonl|diff\.json|compare\.json|eval\.json)\b")


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the constants that are docstrings (prose about the files, not a use of their names)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def run_file_literals(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, text) of every string constant, f-string parts included, that names a run file; docstrings aside."""
    tree = ast.parse(source, filename)
    skip = _docstrings(tree)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
            and RUN_FILE_NAME.search(node.value)]


def test_the_scan_sees_a_run_file_named_in_code_and_not_in_prose():
    code = ('"""Reads metrics.jsonl."""\n'
            'def f(run_dir):\n'
            '    """Writes diff.json."""\n'
            '    a = run_dir / "metrics.jsonl"\n'
            '    b = f"{run_dir}/compare.json"\n'
            '    raise ValueError(f"{run_dir} has no eval.json")\n')
    assert [line for line, _ in run_file_literals(code)] == [4, 5, 6]
    assert run_file_literals('x = "my-metrics.jsonl.bak"') and not run_file_literals('x = "metrics_jsonl"')


def test_no_module_but_runfiles_names_a_run_file():
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {text!r}"
             for path in sorted(PACKAGE.rglob("*.py")) if path.name != "runfiles.py"
             for line, text in run_file_literals(path.read_text(encoding="utf-8"), str(path))]
    assert not found, "run files named outside tunelab/runfiles.py:\n" + "\n".join(found)


def test_runfiles_is_on_the_low_floor_and_readers_of_runs_do_not_import_train():
    from tests.test_imports import import_graph

    graph = import_graph()
    assert graph["tunelab.runfiles"] <= {"tunelab.errors"}
    source = (PACKAGE / "runfiles.py").read_text()
    assert not re.search(r"^\s*(import|from)\s+(torch|transformers|peft)\b", source, re.M)
    readers = [m for m in graph if m.startswith(("tunelab.evaluate", "tunelab.report", "tunelab.plan"))
               or m == "tunelab.doctor"]
    upward = {m: sorted(t for t in graph[m] if t.startswith("tunelab.train")) for m in readers}
    assert not {m: t for m, t in upward.items() if t}, upward


def test_non_finite_metrics_round_trip_through_the_writer(tmp_path):
    path = tmp_path / runfiles.METRICS
    writer = MetricsWriter(path)
    rows = [{"type": "train", "step": 1, "loss": math.nan, "grad_norm": math.inf, "lr": -math.inf, "text": "nan?"},
            {"type": "train", "step": 2, "loss": 1.5, "grad_norm": 0.25, "lr": 1e-3, "text": "inf"}]
    for row in rows:
        writer.write(row)
    writer.close()
    written = [json.loads(line) for line in path.read_text().splitlines()]  # valid JSON: no bare NaN
    assert (written[0]["loss"], written[0]["grad_norm"], written[0]["lr"]) == ("nan", "inf", "-inf")
    assert runfiles.read_rows(path) == written  # as written
    back = runfiles.read_metrics(path)
    assert math.isnan(back[0]["loss"]) and back[0]["grad_norm"] == math.inf and back[0]["lr"] == -math.inf
    assert back[1] == {**rows[1], "text": math.inf}  # a string spelling a non-finite number decodes too
    assert back[0]["text"] == "nan?"  # other strings stay strings
    for spelled in ("NaN", "Infinity", "-Infinity", "inf"):  # hand-written rows, Python's json spelling
        assert runfiles.decode_number(spelled) == float(spelled) or math.isnan(runfiles.decode_number(spelled))
    assert runfiles.encode_number(math.nan) == "nan" and runfiles.encode_number(2.5) == 2.5


def test_a_last_line_cut_short_is_left_out(tmp_path):
    path = tmp_path / runfiles.METRICS
    path.write_text(json.dumps({"type": "train", "step": 1, "loss": "nan"}) + '\n{"type": "tra')
    assert len(runfiles.read_metrics(path)) == 1 and math.isnan(runfiles.read_metrics(path)[0]["loss"])


def _train(tmp_path: Path, model: Path, name: str, strategy: dict) -> Path:
    from tunelab.train.loop import train

    tree = config_tree(model, write_jsonl(tmp_path / "train.jsonl", VARIED_ROWS), tmp_path / name,
                       strategy=strategy, data={"eval_fraction": 0.25},
                       train={"max_steps": 2, "eval_every": 1, "learning_rate": 1e-2})
    return train(validate_config(tree)).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, stories260k: Path) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("runs")
    return {"full": _train(tmp, stories260k, "full", {"name": "full"}),
            "lora": _train(tmp, stories260k, "lora", {"name": "lora"}),
            "prompt_lm": _train(tmp, stories260k, "prompt_lm", {"name": "prompt_lm",
                                                                  "soft_prompt": {"num_virtual_tokens": 4}})}


def test_rows_of_a_kind(runs):
    run = runs["full"]
    raw = [json.loads(line) for line in runfiles.RunFiles(run).metrics.read_text().splitlines()]
    rows = runfiles.run_metrics(run)
    for kind in ("params", "data", "train", "eval", "summary"):
        assert rows.of(kind) == [r for r in raw if r["type"] == kind] and rows.of(kind), kind
    assert [r["step"] for r in rows.of("train")] == [1, 2]
    assert rows.first("params")["trainable_params"] > 0 and rows.first("no such kind") is None
    assert runfiles.run_metrics(run / "nowhere").rows == []


def test_the_strategy_that_saved_final_is_read_from_the_run(runs):
    from tunelab.evaluate.loaders import load_for_eval

    full, lora, prompt_lm = (runfiles.RunFiles(runs[k]) for k in ("full", "lora", "prompt_lm"))
    assert not (full.final / runfiles.ADAPTER_CONFIG).exists()  # a Hugging Face folder
    assert (lora.final / runfiles.ADAPTER_CONFIG).is_file()  # a peft adapter folder
    assert runfiles.strategy_that_saved(full.final) == "full"
    assert runfiles.strategy_that_saved(lora.final) == "lora"
    adapter = prompt_lm.final / runfiles.FINAL_ADAPTER
    assert runfiles.strategy_that_saved(adapter) == "prompt_lm"
    assert runfiles.strategy_that_saved(prompt_lm.final / runfiles.FINAL_BASE) == "prompt_lm"
    assert runfiles.strategy_that_saved(runs["full"]) is None  # the run directory is no saved model folder
    assert prompt_lm.final_tokenizer_dir() == adapter and full.final_tokenizer_dir() == full.final
    # the loader reads it so: prompt+LM's adapter sits over base weights its run trained, LoRA's does not
    assert load_for_eval(str(adapter)).base_trained and not load_for_eval(str(lora.final)).base_trained


def test_an_adapter_copied_out_of_its_run_still_names_the_run_through_its_base(runs, tmp_path):
    import shutil

    copy = tmp_path / "exported-adapter"
    shutil.copytree(runfiles.RunFiles(runs["prompt_lm"]).final / runfiles.FINAL_ADAPTER, copy)
    from tunelab.models.load import read_adapter_config

    base = read_adapter_config(copy)["base_model_name_or_path"]  # the run's final/base, as the run saved it
    assert runfiles.run_that_saved_adapter(copy, base) == runs["prompt_lm"].resolve()
    assert runfiles.run_that_saved_adapter(copy, tmp_path) is None


def test_the_compare_folder_rule():
    assert runfiles.compare_dir("runs/sst2") == Path("runs/sst2-compare")
    assert runfiles.compare_of(Path("/x/out")) == Path("/x/out-compare") / runfiles.COMPARE
