"""Where a training step's time goes: one optimizer step of tunelab's own loop (`take_step`, on a session set up
as the recipe sets it up) under torch's profiler, on a real model and real rows; the operators by self CPU time,
and their shares grouped into parts of the step (matrix products, attention, element-wise work, the optimizer,
the rest). Issue 31's profile on SmolLM2-135M.

    python bench/profile_step.py --model models/smollm2 --strategy lora
    python bench/profile_step.py --model models/smollm2 --strategy full --rows 16
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BANKING77 = ROOT.parent / "shared" / "data" / "banking77" / "train.csv"
PARTS = {  # operator name -> part of the step (the first pattern that the name contains)
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax"),
    "optimizer": ("adam", "Optimizer"),
    "element-wise": ("aten::mul", "aten::add", "aten::silu", "aten::pow", "aten::mean", "aten::rsqrt", "aten::neg",
                     "aten::cat", "aten::copy_", "aten::to", "aten::bernoulli", "aten::div", "aten::sum",
                     "aten::sub", "aten::clone", "aten::fill_", "aten::zero_", "aten::index", "aten::embedding",
                     "aten::exp", "aten::log", "aten::max", "aten::sigmoid", "aten::where", "aten::masked"),
}


def part_of(name: str) -> str:
    return next((part for part, keys in PARTS.items() if any(k in name for k in keys)), "other")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--strategy", choices=["lora", "full"], default="lora")
    ap.add_argument("--rows", type=int, default=16, help="rows a step (banking77 questions as chats)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast (AMX on this CPU)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from tunelab.config import validate_config
    from tunelab.models.load import load_model, pad_token_id
    from tunelab.plan.run import load_train_data
    from tunelab.train.loop import take_step
    from tunelab.train.session import open_session, prepare_model, setup_device, use_speed_options

    with tempfile.TemporaryDirectory() as tmp:
        with BANKING77.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))[::50][:200]  # a spread of intents
        data = Path(tmp) / "chats.jsonl"
        data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["text"]},
                                                          {"role": "assistant", "content": r["category"]}]})
                                + "\n" for r in rows))
        cfg = validate_config({"model": {"path": str(args.model)}, "data": {"train": str(data), "max_length": 128},
                               "strategy": {"name": args.strategy, "lora": {"rank": 16}},
                               "train": {"max_steps": 8, "batch_size": args.rows, "learning_rate": 1e-4,
                                         "progress": False, "precision": args.precision},
                               "output_dir": str(Path(tmp) / "run")})
        _, examples, tokenizer = load_train_data(cfg)
        hw = setup_device(cfg.train)
        model = prepare_model(load_model(cfg.model), cfg, tokenizer, hw.device)
        use_speed_options(model, cfg.train, hw.device)  # as the recipe does
        session = open_session(cfg, model, examples, pad_token_id(tokenizer), hw, steps=8)
        for _ in range(2):
            take_step(session)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            take_step(session)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    parts: dict[str, float] = defaultdict(float)
    for e in events:
        parts[part_of(e.key)] += e.self_cpu_time_total
    print(f"{args.strategy} on {args.model.name}, {args.rows} rows a step, {torch.get_num_threads()} threads, "
          f"{args.precision}: {total / 1e6:.2f} s of operator self time in one step")
    print("| part | share |\n| --- | ---: |")
    for part, t in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {part} | {t / total:.1%} |")
    print("| operator | self CPU | share | calls |\n| --- | ---: | ---: | ---: |")
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]
    for e in top:
        print(f"| `{e.key}` | {e.self_cpu_time_total / 1e3:.0f} ms | {e.self_cpu_time_total / total:.1%} | {e.count} |")
    if args.json:
        args.json.write_text(json.dumps({"parts": {k: v / total for k, v in parts.items()},
                                         "top": [[e.key, e.self_cpu_time_total, e.count] for e in top]}, indent=2))


if __name__ == "__main__":
    main()
