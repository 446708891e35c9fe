"""The demo's labeled data and probes, written from the generated world with fixed seeds."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tunelab.demo_world.corpus import corpus
from tunelab.demo_world.tickets import tickets
from tunelab.demo_world.world import arithmetic, build_world, facts

WORLD_SEED = 7
TICKET_SEED = 11
REFERENCE_SEED = 99  # general text of the same world, not the pre-training documents themselves


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_demo_data(out: Path, n_train: int = 400, n_eval: int = 100) -> dict[str, Path]:
    """summary_{train,eval}.jsonl, intent_{train,eval}.jsonl, probes.jsonl and reference.txt in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    w = build_world(WORLD_SEED)
    tix = tickets(w, n_train + n_eval, TICKET_SEED)
    split = {"train": tix[:n_train], "eval": tix[n_train:]}
    paths = {}
    for name, part in split.items():
        paths[f"summary_{name}"] = _jsonl(out / f"summary_{name}.jsonl",
                                          [{"prompt": t.text, "completion": t.summary} for t in part])
        paths[f"intent_{name}"] = _jsonl(out / f"intent_{name}.jsonl",
                                         [{"prompt": t.text, "completion": t.intent} for t in part])
    rng = random.Random(WORLD_SEED)
    probe_facts = rng.sample(facts(w), 40) + arithmetic(random.Random(REFERENCE_SEED), 20)
    paths["probes"] = _jsonl(out / "probes.jsonl", [{"prompt": p, "answer": a} for p, a in probe_facts])
    reference = corpus(w, REFERENCE_SEED, n_stories=12, n_customer=12, n_arith=16, fact_repeats=0)
    paths["reference"] = out / "reference.txt"
    paths["reference"].write_text("\n\n".join(reference[:24]) + "\n")
    return paths
