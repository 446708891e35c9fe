"""`tunelab plan` against measurements on this CPU: peak memory and step time (a benchmark, not a test).

The same cases as tests/plan/test_validation.py (stories260K and two config-built sizes x full, lora and
soft_prompt, and the top layer alone (freeze) of the small one), and the real SmolLM2-135M-Instruct (30 layers,
a 49k vocabulary; LoRA and full) on a heavier workload than the test's 1,024
tokens per step: 1,500 GSM8K training examples, rows of 512, 3,072 tokens per step. Each case is planned with `--measure` (real optimizer steps of
cut copies of the model, tunelab.train.timing), trained for 8 steps in a fresh process whose peak resident
memory and median step time (steps 3-8) are measured, and planned again; the faster of the two plans is
compared (another process only ever slows a timing down). Wall-clock figures belong here, not in the test
suite: the suite asserts the memory estimate only.

    python bench/plan_validation.py                 # every case; prints a markdown table
    python bench/plan_validation.py --case small:full --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SIZES = {"small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=4096),
         "medium": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                        num_key_value_heads=8, vocab_size=8192)}
CASES = [f"{size}:{strategy}" for size in ("stories260K", "small", "medium")
         for strategy in ("full", "lora", "soft_prompt")] + ["small:freeze", "smollm2:lora", "smollm2:full"]
SMOLLM2_GGUF = SHARED / "smollm2_135m_instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_models(work: Path, cases: list[str]) -> dict[str, Path]:
    """stories260K converted from ../shared/data, the two config-built sizes with its tokenizer, and (for its
    cases) the real SmolLM2-135M-Instruct converted from its GGUF file."""
    from tunelab.models.gguf import convert_gguf
    from tunelab.models.llama2c import convert_llama2c

    out = {"stories260K": convert_llama2c(SHARED / "stories260K/stories260K.bin", SHARED / "stories260K/tok512.bin",
                                          work / "stories260K")}
    for name, arch in SIZES.items():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**arch, tie_word_embeddings=True)).save_pretrained(work / name)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(out["stories260K"] / f, work / name / f)
        out[name] = work / name
    if any(c.startswith("smollm2:") for c in cases):
        out["smollm2"] = convert_gguf(SMOLLM2_GGUF, work / "smollm2")
    return out


def case_tree(model: Path, data: Path, out: Path, strategy: str, steps: int) -> dict:
    """The validation workload's config (shared with tests/plan/test_validation.py)."""
    return {"model": {"path": str(model)},
            "data": {"train": str(data), "max_length": 512, "columns": {"prompt": "question", "completion": "answer"}},
            "strategy": {"name": strategy, "freeze": {"trainable_layers": 1},
                         "template": {"prompt": "Question: {prompt}\nAnswer:", "target": " {completion}"}},
            "train": {"max_steps": steps, "tokens_per_step": 3072, "learning_rate": 1e-3, "batch_size": 2, "seed": 0,
                      "progress": False},
            "output_dir": str(out)}


def write_gsm8k_rows(path: Path, n: int = 1500) -> Path:
    lines = (SHARED / "gsm8k/train.jsonl").read_text().splitlines()[:n]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def measure_run(cfg_path: Path) -> tuple[float, float]:
    """Train in a fresh process; returns its peak resident memory (bytes) and median step time (steps 3+)."""
    from tunelab.runfiles import read_metrics

    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg_path)], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    rows = read_metrics(Path(yaml.safe_load(cfg_path.read_text())["output_dir"]) / "metrics.jsonl")
    steps = [r["seconds"] for r in rows if r["type"] == "train"][2:]
    peak = next(r for r in rows if r["type"] == "summary")["peak_memory_bytes"]
    return peak, statistics.median(steps) if steps else float("nan")


def validate_case(models: dict[str, Path], data: Path, work: Path, case: str) -> dict:
    from tunelab.config import validate_config
    from tunelab.plan.run import plan
    from tunelab.train.timing import measured_step_seconds

    size, strategy = case.split(":")
    tree = case_tree(models[size], data, work / case.replace(":", "-"), strategy, steps=8)
    cfg_path = work / f"{case.replace(':', '-')}.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    before = plan(validate_config(tree), "cpu", strategies=[strategy], step_timer=measured_step_seconds)
    peak, step = measure_run(cfg_path)
    after = plan(validate_config(tree), "cpu", strategies=[strategy], step_timer=measured_step_seconds)
    unmeasured = plan(validate_config(tree), "cpu", strategies=[strategy]).estimates[strategy]
    b, a = before.estimates[strategy], after.estimates[strategy]
    return {"case": case, "memory_estimate": b.memory_bytes["total"], "memory_measured": peak,
            "step_estimate": min(b.step_seconds, a.step_seconds), "step_estimates": [b.step_seconds, a.step_seconds],
            "step_flops_bound": unmeasured.step_seconds, "step_measured": step}


def table(records: list[dict]) -> str:
    def err(e: float, m: float) -> str:
        return f"{100 * (e - m) / m:+.0f}%"

    out = ["| case | memory estimate | memory measured | error | step --measure | step measured | error | "
           "FLOPs bound |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        out.append(f"| {r['case']} | {r['memory_estimate'] / 2**20:,.0f} MiB | {r['memory_measured'] / 2**20:,.0f} MiB"
                   f" | {err(r['memory_estimate'], r['memory_measured'])} | {r['step_estimate']:.2f} s"
                   f" | {r['step_measured']:.2f} s | {err(r['step_estimate'], r['step_measured'])}"
                   f" | {r['step_flops_bound']:.2f} s |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", choices=CASES, help="size:strategy (repeatable; default: all)")
    ap.add_argument("--json", type=Path, help="write the records here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = args.case or CASES
        models, data = build_models(work, cases), write_gsm8k_rows(work / "gsm8k.jsonl")
        records = []
        for case in cases:
            records.append(validate_case(models, data, work, case))
            print(json.dumps(records[-1]), flush=True)
    print(table(records))
    if args.json:
        args.json.write_text(json.dumps({"records": records}, indent=2))


if __name__ == "__main__":
    main()
