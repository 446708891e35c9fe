"""AdamW's step on the CPU: torch's multi-tensor path (its CPU default) against its fused kernel, which tunelab
uses by default since 2026-12-07. Two measurements in one run:

1. the optimizer step alone over a model's parameter shapes (random gradients): the 134.5M parameters of
   SmolLM2-135M by default (one 49,152 x 576 table, 30 layers of 7 matrices), median of 5 steps after 1;
2. with --model DIR, full tuning of that model for --steps steps of 4 short rows (tunelab train, fused_adamw false
   and true, alternating, --repeats times): the median step time of steps 3 on, and the losses (equal to 5 places).

    python bench/optimizer_step.py
    python bench/optimizer_step.py --model models/smollm2 --repeats 2
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMOLLM2_SHAPES = [(49152, 576)] + [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
                                    (576, 1536)] * 30


def step_seconds(fused: bool, shapes: list[tuple[int, int]]) -> float:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=fused or None)
    opt.step()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def full_tuning(model: Path, fused: bool, steps: int, work: Path) -> tuple[float, list[float]]:
    from tests.conftest import VARIED_ROWS, config_tree, write_jsonl
    from tunelab.config import validate_config
    from tunelab.runfiles import read_metrics
    from tunelab.train.loop import train

    out = work / f"run-{fused}"
    shutil.rmtree(out, ignore_errors=True)
    tree = config_tree(model, write_jsonl(work / "rows.jsonl", VARIED_ROWS), out, strategy={"name": "full"},
                       data={"max_length": 64}, train={"max_steps": steps, "batch_size": 4, "learning_rate": 1e-5,
                                                       "fused_adamw": fused, "progress": False})
    train(validate_config(tree))
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"]
    return statistics.median(r["seconds"] for r in rows[2:]), [round(r["loss"], 5) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a model folder to fully tune (e.g. SmolLM2 from tunelab convert gguf)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(f"threads: {torch.get_num_threads()}; parameters: {sum(a * b for a, b in SMOLLM2_SHAPES) / 1e6:.1f}M")
    multi, fused = step_seconds(False, SMOLLM2_SHAPES), step_seconds(True, SMOLLM2_SHAPES)
    print(f"optimizer step: multi-tensor {multi:.3f} s, fused {fused:.3f} s ({multi / fused:.2f}x)")
    if args.model:
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.repeats):
                for flag in (False, True):
                    seconds, losses = full_tuning(args.model, flag, args.steps, Path(tmp))
                    print(f"full tuning, {'fused' if flag else 'multi-tensor'}: {seconds:.3f} s a step, losses {losses}",
                          flush=True)


if __name__ == "__main__":
    main()
