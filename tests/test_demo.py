"""The built-in demo: its generated data and `tunelab demo --quick` (the full demo's tasks: tests/test_demo_task_*.py)."""

import json

from tunelab.cli import main
from tunelab.demo_world.build import MODEL_DIR
from tunelab.demo_world.corpus import corpus
from tunelab.demo_world.data import WORLD_SEED, write_demo_data
from tunelab.demo_world.world import build_world


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_demo_data_is_reproducible_varied_and_split(tmp_path):
    a, b = write_demo_data(tmp_path / "a"), write_demo_data(tmp_path / "b")
    for key, path in a.items():
        assert path.read_bytes() == b[key].read_bytes(), key  # fixed seeds: the same files every time
    train, evals = _rows(a["summary_train"]), _rows(a["summary_eval"])
    assert (len(train), len(evals)) == (400, 100)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}  # held out means held out
    assert len({r["prompt"] for r in train}) == len(train)
    # varied: many distinct summaries and ticket openings, lengths spread over a wide range
    assert len({r["completion"] for r in train}) > 150
    lengths = sorted(len(r["prompt"].split()) for r in train)
    assert lengths[-1] - lengths[0] >= 15
    intent = _rows(a["intent_train"])
    assert {r["completion"] for r in intent} == {"refund", "replacement", "repair", "help"}
    probes = _rows(a["probes"])
    assert len(probes) == 60 and all(p["prompt"] and p["answer"] for p in probes)


def test_pretraining_corpus_never_contains_the_task():
    docs = corpus(build_world(WORLD_SEED), 1, n_stories=300, n_customer=300, n_arith=100, fact_repeats=1)
    text = "\n".join(docs)
    assert "Summary:" not in text and "wants a refund" not in text and "Ticket:" not in text


def test_the_committed_model_is_small_and_complete():
    weights = MODEL_DIR / "model.safetensors"
    assert weights.exists() and (MODEL_DIR / "tokenizer.json").exists() and (MODEL_DIR / "RECIPE.json").exists()
    assert weights.stat().st_size < 16 * 2**20


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--steps", "6", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Task 1" in out and "Task 2" in out and "recommendation for task 1:" in out and "Task 3" not in out
    result = json.loads((tmp_path / "demo.json").read_text())
    rows = {r["strategy"]: r for r in result["summary"]["table"]}
    assert set(rows) == {"zero-shot", "lora"}
    assert rows["lora"]["trainable_params"] > 0 and rows["zero-shot"]["trainable_params"] == 0
    assert 0 <= rows["lora"]["rouge_l"] <= 1 and rows["lora"]["perplexity_ratio"] > 0
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "recommendation" in html.lower()
    lora_rows = [json.loads(line) for line in (tmp_path / "summary-compare" / "lora" / "metrics.jsonl").open()]
    assert [r["step"] for r in lora_rows if r["type"] == "train"] == list(range(1, 7))  # --steps 6
