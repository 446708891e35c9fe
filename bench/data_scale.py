"""Data at scale: time to the first step, peak memory and encode throughput, tunelab against TRL's SFTTrainer.

Synthetic prompt/completion rows (seeded sentences over a fixed vocabulary of English words; about 110 tokens
each with the demo model's small tokenizer) at 20k, 200k and 2M rows. tunelab runs `tunelab train` with
`train.max_steps: 2` (packed, `tokens_per_step: 4096`) in a fresh process, twice: with an empty data cache
(cold) and again (warm). TRL prepares the same rows as its SFTTrainer does (a `datasets` JSON dataset,
completion-only loss, the same `num_proc`) on 20k and 200k rows, then trains the same two steps (32 rows a step,
about tunelab's 4,096 tokens), so that both peaks include a training step. Each measurement is its own process, so its
peak resident memory is its own.

    python bench/data_scale.py                           # 20k, 200k, 2M (TRL on 20k, 200k)
    python bench/data_scale.py --rows 2000 --trl-rows 2000 --num-proc 2   # a quick check

Printed: seconds to the first step (cold, warm), the warm/cold ratio, peak RSS, encode throughput (tokens/s:
the tokens encoded over the cold-minus-warm time to the first step for tunelab; over the whole preparation for
TRL), and the ratios to TRL at the same size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tunelab" / "demo_world" / "model"
WORDS = ("the a my your card account money transfer bank payment app phone number address pin code limit fee "
         "refund cash machine balance top up exchange rate currency wallet virtual physical delivery arrive "
         "when why how can I not is was did still yet already today yesterday week declined pending failed "
         "blocked stolen lost new old change verify identity password help please").split()


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40)))
            completion = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))
            f.write(json.dumps({"prompt": f"Customer: {prompt}\nIntent:", "completion": f" {completion}"}) + "\n")


def run_tunelab(data: Path, work: Path, num_proc: int) -> dict:
    import yaml

    config = {"model": {"path": str(MODEL)},
              "data": {"train": str(data), "max_length": 128, "cache_dir": str(work / "cache"), "num_proc": num_proc},
              "strategy": {"name": "full"},
              "train": {"max_steps": 2, "tokens_per_step": 4096, "progress": False},
              "output_dir": str(work / "run"), "overwrite": True}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = {}
    for kind in ("cold", "warm"):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(path)], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
        summary = next(r for r in rows if r["type"] == "summary")
        data_row = next(r for r in rows if r["type"] == "data")
        out[kind] = {"first_step_s": wall - summary["loop_seconds"], "wall_s": wall,
                     "peak_rss_bytes": summary["peak_memory_bytes"], "tokens": data_row["num_tokens"]}
    encode_s = out["cold"]["first_step_s"] - out["warm"]["first_step_s"]
    out["encode_tokens_per_s"] = out["cold"]["tokens"] / encode_s if encode_s > 0 else None
    return out


def trl_child(data: str, num_proc: int) -> None:
    """Runs in its own process: SFTTrainer's preparation of the rows, timed, with the process's peak RSS."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tunelab.train.metrics import peak_rss_bytes

    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    rows = datasets.load_dataset("json", data_files=data, split="train")
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_length=128, completion_only_loss=True,
                     dataset_num_proc=num_proc if num_proc > 1 else None, report_to=[], max_steps=2,
                     per_device_train_batch_size=32, use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    seconds = time.perf_counter() - t0
    prepared_rss = peak_rss_bytes()
    trainer.train()  # the same two steps as tunelab's run (32 rows of about 110 tokens: about its 4,096 a step)
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    print(json.dumps({"prepare_s": seconds, "tokens": tokens, "peak_rss_bytes": peak_rss_bytes(),
                      "prepared_peak_rss_bytes": prepared_rss}))


def run_trl(data: Path, work: Path, num_proc: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(work / "hf-datasets"),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, "--trl-child", str(data), "--num-proc", str(num_proc)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["encode_tokens_per_s"] = out["tokens"] / out["prepare_s"]
    return out


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000, 2_000_000])
    p.add_argument("--trl-rows", type=int, nargs="*", default=[20_000, 200_000])
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--trl-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_child:
        trl_child(args.trl_child, args.num_proc)
        return 0
    results = {"num_proc": args.num_proc, "machine": os.uname().machine, "cpus": os.cpu_count(), "sizes": {}}
    work_root = Path(tempfile.mkdtemp(prefix="tunelab-data-scale-"))
    try:
        for n in args.rows:
            work = work_root / str(n)
            work.mkdir()
            data = work / "rows.jsonl"
            write_rows(data, n)
            entry = {"rows": n, "file_bytes": data.stat().st_size, "tunelab": run_tunelab(data, work, args.num_proc)}
            shutil.rmtree(work / "cache", ignore_errors=True)
            if n in args.trl_rows:
                entry["trl"] = run_trl(data, work, args.num_proc)
            results["sizes"][str(n)] = entry
            report_size(entry)
            shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    sizes = results["sizes"]
    if len(sizes) > 1:
        small, large = sorted(sizes.values(), key=lambda e: e["rows"])[-2:]
        growth = large["tunelab"]["cold"]["peak_rss_bytes"] / small["tunelab"]["cold"]["peak_rss_bytes"]
        print(f"peak RSS at {large['rows']:,} rows / at {small['rows']:,} rows: x{growth:.2f} "
              f"({large['rows'] / small['rows']:.0f}x the rows)")
        results["rss_growth"] = growth
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


def report_size(e: dict) -> None:
    t = e["tunelab"]
    cold, warm = t["cold"], t["warm"]
    print(f"--- {e['rows']:,} rows ({e['file_bytes'] / 2**20:.0f} MiB, {cold['tokens']:,} tokens)")
    print(f"tunelab: first step cold {cold['first_step_s']:.1f} s, warm {warm['first_step_s']:.1f} s "
          f"(warm/cold {warm['first_step_s'] / cold['first_step_s']:.1%}); peak RSS cold {gib(cold['peak_rss_bytes'])}, "
          f"warm {gib(warm['peak_rss_bytes'])}; encode {t['encode_tokens_per_s'] or 0:,.0f} tokens/s")
    if "trl" in e:
        r = e["trl"]
        print(f"TRL SFTTrainer: preparation {r['prepare_s']:.1f} s, peak RSS {gib(r['peak_rss_bytes'])} (after the "
              f"preparation {gib(r['prepared_peak_rss_bytes'])}), encode {r['encode_tokens_per_s']:,.0f} tokens/s")
        print(f"ratios tunelab/TRL: peak RSS x{cold['peak_rss_bytes'] / r['peak_rss_bytes']:.2f}, "
              f"encode throughput x{(t['encode_tokens_per_s'] or 0) / r['encode_tokens_per_s']:.2f}, "
              f"tunelab's cold time to the first step (from the process's start) / TRL's preparation (from its "
              f"imports' end) x{cold['first_step_s'] / r['prepare_s']:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
