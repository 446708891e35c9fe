"""Supervised fine-tuning throughput: tunelab against Hugging Face Trainer and TRL's SFTTrainer.

One identical synthetic labeled workload (4,000 examples of random token ids; prompt length
clip(lognormal(5.0, 0.8), 8, 1500), completion length clip(lognormal(4.8, 0.9), 4, 1000)), one
randomly initialised model built from a config and saved once so that every system loads the same
weights, about the same number of real tokens per optimizer step for every system, 5 warm-up steps,
then timed steps. Each system runs in a fresh subprocess (so peak memory is its own) and reports
real (non-pad) tokens/s, label tokens/s, peak memory, and on a GPU the MFU.

    python bench/sft_throughput.py --shape tiny --device cpu
    python bench/sft_throughput.py --shape qwen2.5-0.5b --device cuda --wheels .whl
    python bench/sft_throughput.py --smoke            # a few steps, no timing claims (CI)

A real model and real rows instead (issue 31): `--model DIR` (a Hugging Face folder with a chat template, e.g.
`tunelab convert gguf` of ../shared/data/smollm2_135m_instruct) and `--data` (banking77's CSV: the question as the
user turn, the intent as the reply; or a JSONL of {"messages": [...]}), each chat rendered once by the model's own
template into prompt ids (the template with the generation prompt) and completion ids (the rest, the end of turn
included), which every system then trains on; `--strategy lora` adds rank-16 LoRA on every linear layer (alpha 32,
`--lora-dropout`, 0.05 by default) to every system (tunelab's strategy, peft's LoraConfig for the others).

    python bench/sft_throughput.py --model models/smollm2 --data ../shared/data/banking77/train.csv \
        --strategy lora --tokens-per-step 1024 --max-length 512
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ["tunelab", "tunelab_liger", "hf_trainer", "trl", "trl_packed", "trl_packed_liger", "tunelab_qlora",
           "trl_packed_qlora"]
# the QLoRA pair (an nf4 base with double quantization, LoRA rank 16 on every linear layer): tunelab's
# strategy.lora.quantize against TRL + peft's own recipe (BitsAndBytesConfig, prepare_model_for_kbit_training, a
# LoraConfig handed to SFTTrainer); on a GPU only by default, as the Liger pair
QLORA_LORA = {"rank": 16, "alpha": 32.0, "dropout": 0.0}
SHAPES = {
    # a small model with a real-world vocabulary: where the LM head dominates, as in SFT of small models
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=1024, vocab_size=151_936),
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151_936, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
    # SmolLM2-135M-Instruct's dimensions (its GGUF is too large to travel to a lent GPU; for speed the weights do
    # not matter): 30 layers, hidden 576, 9 query and 3 KV heads, tied embeddings
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49_152, rope_theta=100_000.0, rms_norm_eps=1e-5),
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=4096),
}
MAX_LENGTH = 2048  # the longest workload example (prompt <= 1500 + completion <= 1000, as drawn) fits
LORA = {"rank": 16, "alpha": 32.0}  # --strategy lora, every system; the dropout is --lora-dropout


def chat_workload(model_dir: Path, data: Path, n: int, max_length: int, seed: int = 0
                  ) -> list[tuple[list[int], list[int]]]:
    """`n` seeded rows of `data` as (prompt ids, completion ids) through the model's own chat template."""
    import csv
    import random

    from transformers import AutoTokenizer

    if data.suffix == ".csv":
        with data.open(newline="", encoding="utf-8") as f:
            chats = [[{"role": "user", "content": r[0]}, {"role": "assistant", "content": r[1]}]
                     for r in list(csv.reader(f))[1:]]
    else:
        chats = [json.loads(line)["messages"] for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(seed).shuffle(chats)
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for chat in chats[:n]:
        prompt = tok.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tok.apply_chat_template(chat, tokenize=True, return_dict=False)
        if full[: len(prompt)] == prompt and len(full) <= max_length:
            out.append((list(prompt), list(full[len(prompt):])))
    return out


def workload_of(args: argparse.Namespace) -> list[tuple[list[int], list[int]]]:
    if args.model:
        return chat_workload(Path(args.model), Path(args.data), args.examples, args.max_length)
    return make_workload(args.examples, SHAPES[args.shape]["vocab_size"])


def peft_lora_config(args: argparse.Namespace):
    from peft import LoraConfig

    return LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=args.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def make_workload(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    prompt_len = np.clip(rng.lognormal(5.0, 0.8, n), 8, 1500).astype(int)
    completion_len = np.clip(rng.lognormal(4.8, 0.9, n), 4, 1000).astype(int)
    out = []
    for p, c in zip(prompt_len, completion_len):
        ids = rng.integers(3, vocab, int(p + c)).tolist()
        out.append((ids[:p], ids[p:]))
    return [(p, c) for p, c in out if len(p) + len(c) <= MAX_LENGTH]


def build_model_dir(shape: str, out: Path) -> Path:
    """Save one randomly initialised Qwen2-architecture model and a minimal tokenizer."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    tok = Tokenizer(WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out)
    return out


def learning_rate(args: argparse.Namespace) -> float:
    return 1e-4 if args.strategy == "lora" else 1e-5


def peak_memory_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    from tunelab.train.metrics import peak_rss_bytes  # the process's own peak (VmHWM), as tunelab reports it

    return peak_rss_bytes()


# ---------------------------------------------------------------- workers (one system per process)

def run_tunelab(args: argparse.Namespace, workload: list, model_dir: Path, work: Path, liger: bool = False,
                qlora: bool = False) -> dict:
    from tunelab.config import validate_config
    from tunelab.train.loop import train
    from tunelab.runfiles import read_metrics

    data = work / "workload.jsonl"
    data.write_text("".join(json.dumps({"prompt_ids": p, "completion_ids": c}) + "\n" for p, c in workload))
    cfg = validate_config({
        "model": {"path": str(model_dir)},
        "data": {"train": str(data), "max_length": args.max_length},
        "train": {"max_steps": args.warmup + args.steps, "learning_rate": learning_rate(args), "tokens_per_step": args.tokens_per_step,
                  "seed": 0, "progress": False, "device": args.device, "max_grad_norm": 1.0,
                  "precision": precision(args),
                  "loss_kernel": "liger" if liger else "chunked"},
        "output_dir": str(work / "tunelab-run"),
        **({"strategy": {"name": "lora", "lora": {**QLORA_LORA, "quantize": "nf4", "double_quant": True}}}
           if qlora else {"strategy": {"name": "lora", "lora": {**LORA, "dropout": args.lora_dropout}}}
           if args.strategy == "lora" else {}),
    })
    result = train(cfg)
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r["type"] == "train"]
    timed = rows[args.warmup:]
    seconds = timed[-1]["elapsed_s"] - rows[args.warmup - 1]["elapsed_s"]
    return {"seconds": seconds, "tokens": sum(r["num_tokens"] for r in timed),
            "label_tokens": sum(r["num_label_tokens"] for r in timed), "steps": len(timed),
            "final_loss": rows[-1]["loss"]}


class CountingCollator:
    """Wraps a collator and records each batch's real tokens and (shifted) label tokens."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, features):
        batch = self.inner(features)
        labels = batch["labels"]
        if "attention_mask" in batch:
            real = int(batch["attention_mask"].sum())
        else:  # padding-free: one flat row of real tokens
            real = int(batch["input_ids"].numel())
        self.batches.append((real, int((labels[:, 1:] != -100).sum())))
        return batch


def _timing_callback(device: str):
    import torch
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    return StepTimes()


def _trainer_result(args, trainer, collator, timer) -> dict:
    # the collator runs one batch ahead of the step; batch k belongs to step k
    batches = collator.batches[args.warmup : args.warmup + args.steps]
    loss = next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), float("nan"))
    return {"seconds": timer.times[-1] - timer.times[args.warmup - 1], "tokens": sum(b[0] for b in batches),
            "label_tokens": sum(b[1] for b in batches), "steps": len(timer.times) - args.warmup, "final_loss": loss}


def _training_args(args, cls, **extra):
    import torch

    cuda = args.device == "cuda"
    return cls(output_dir=str(Path(args.work) / "out"), max_steps=args.warmup + args.steps,
               learning_rate=learning_rate(args),
               lr_scheduler_type="cosine", logging_steps=args.warmup + args.steps, save_strategy="no",
               report_to="none", bf16=precision(args) == "bf16", use_cpu=not cuda, dataloader_num_workers=0,
               max_grad_norm=1.0,
               optim="adamw_torch_fused" if cuda else "adamw_torch", seed=0, disable_tqdm=True,
               remove_unused_columns=False, **extra), torch


def precision(args) -> str:
    """The precision every system trains in: `--precision`, else bf16 autocast on a GPU and float32 on the CPU."""
    return args.precision or ("bf16" if args.device == "cuda" else "fp32")


def examples_per_step(args, workload) -> int:
    """Padded systems take whole examples: as many as carry the packed systems' tokens per step on average."""
    mean = sum(len(p) + len(c) for p, c in workload) / len(workload)
    return max(1, round(args.tokens_per_step / mean))


def run_hf_trainer(args, workload, model_dir: Path, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    rows = [{"input_ids": p + c, "labels": [-100] * len(p) + c} for p, c in workload]

    def pad(features):
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    collator = CountingCollator(pad)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    if args.strategy == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, peft_lora_config(args))
    targs, _ = _training_args(args, TrainingArguments, per_device_train_batch_size=examples_per_step(args, workload))
    timer = _timing_callback(args.device)
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collator, callbacks=[timer])
    trainer.train()
    return _trainer_result(args, trainer, collator, timer)


def qlora_model_and_peft_config(args, model_dir: Path) -> tuple:
    """TRL + peft's QLoRA: the base in nf4 (double quantization, bf16 compute on a GPU), peft's k-bit preparation,
    and the LoRA config SFTTrainer wraps it with."""
    import torch
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = args.device == "cuda"
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization,
                                                 attn_implementation="sdpa", device_map={"": 0} if cuda else "cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, LoraConfig(r=QLORA_LORA["rank"], lora_alpha=QLORA_LORA["alpha"], lora_dropout=0.0,
                             target_modules="all-linear", task_type="CAUSAL_LM")


def run_trl(args, workload, model_dir: Path, work: Path, packed: bool, liger: bool = False,
            qlora: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict({"input_ids": [p + c for p, c in workload],
                              "completion_mask": [[0] * len(p) + [1] * len(c) for p, c in workload]})
    extra = {"packing": True, "packing_strategy": "bfd",
             "per_device_train_batch_size": max(1, args.tokens_per_step // args.max_length)} \
        if packed else {"per_device_train_batch_size": examples_per_step(args, workload)}
    if liger:
        extra["use_liger_kernel"] = True
    targs, _ = _training_args(args, SFTConfig, max_length=args.max_length, completion_only_loss=True,
                              dataset_num_proc=None, **extra)
    peft_config = None
    if qlora:
        model, peft_config = qlora_model_and_peft_config(args, model_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        peft_config = peft_lora_config(args) if args.strategy == "lora" else None
    timer = _timing_callback(args.device)
    trainer = SFTTrainer(model=model, args=targs, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(model_dir),
                         callbacks=[timer], peft_config=peft_config)
    collator = CountingCollator(trainer.data_collator)
    trainer.data_collator = collator
    trainer.train()
    return _trainer_result(args, trainer, collator, timer)


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads) if args.threads else None
    workload = workload_of(args)
    work = Path(tempfile.mkdtemp(dir=args.work))
    model_dir = Path(args.model) if args.model else Path(args.work) / "model"
    runners = {"tunelab": lambda: run_tunelab(args, workload, model_dir, work),
               "tunelab_liger": lambda: run_tunelab(args, workload, model_dir, work, liger=True),
               "hf_trainer": lambda: run_hf_trainer(args, workload, model_dir, work),
               "trl": lambda: run_trl(args, workload, model_dir, work, packed=False),
               "trl_packed": lambda: run_trl(args, workload, model_dir, work, packed=True),
               "trl_packed_liger": lambda: run_trl(args, workload, model_dir, work, packed=True, liger=True),
               "tunelab_qlora": lambda: run_tunelab(args, workload, model_dir, work, qlora=True),
               "trl_packed_qlora": lambda: run_trl(args, workload, model_dir, work, packed=True, qlora=True)}
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = runners[args.worker.partition("@")[0]]()
    result["peak_memory_bytes"] = peak_memory_bytes(args.device)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- driver

def shape_of(args: argparse.Namespace) -> dict:
    """The model's dimensions: --shape's, or the config.json of --model."""
    return json.loads((Path(args.model) / "config.json").read_text()) if args.model else SHAPES[args.shape]


def flops_per_token(s: dict, workload: list) -> float:
    """Model FLOPs per trained token (PaLM appendix B): 6 x matmul parameters + causal attention."""
    d, layers, vocab, inter = s["hidden_size"], s["num_hidden_layers"], s["vocab_size"], s["intermediate_size"]
    kv = d * s["num_key_value_heads"] // s["num_attention_heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * inter
    lengths = [len(p) + len(c) for p, c in workload]
    mean_context = sum(n * n for n in lengths) / sum(lengths)  # tokens attended per token, averaged over tokens
    return 6 * (layers * per_layer + d * vocab) + 6 * layers * d * mean_context  # causal: half of 12*L*d*T


def measured_matmul_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - t0) / 1e12


def run_system(system: str, args: argparse.Namespace) -> dict:
    """One system in its own process; `name@bf16` or `name@fp32` sets its precision over --precision."""
    chosen = system.partition("@")[2] or args.precision
    cmd = [sys.executable, __file__, "--worker", system, *(["--precision", chosen] if chosen else []),
           "--shape", args.shape, "--device", args.device,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--examples", str(args.examples),
           "--tokens-per-step", str(args.tokens_per_step), "--work", args.work, "--threads", str(args.threads),
           "--max-length", str(args.max_length), "--strategy", args.strategy, "--lora-dropout", str(args.lora_dropout),
           *(["--model", args.model, "--data", args.data] if args.model else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:300] if (proc.stderr or proc.stdout)
                else f"exit code {proc.returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--systems", default=None, help="comma-separated, default: all that run on the device; "
                        "NAME@bf16 or NAME@fp32 runs a system in that precision (e.g. tunelab@bf16,trl_packed)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--tokens-per-step", type=int, default=4096, help="a multiple of 2048 (two packed rows)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--smoke", action="store_true", help="a few steps on a tiny model: checks the harness runs")
    parser.add_argument("--wheels", help="install TRL and datasets from this folder of wheel files first (no network)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: measured matmul)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--model", help="a real model folder (with a chat template) instead of --shape's random one")
    parser.add_argument("--data", help="with --model: banking77's CSV, or a JSONL of {messages}",
                        default=str(ROOT.parent / "shared" / "data" / "banking77" / "train.csv"))
    parser.add_argument("--strategy", choices=["full", "lora"], default="full")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="bf16 autocast or float32 for every system (default: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH, help="the longest row (and TRL's packed row)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.smoke:
        args.shape, args.steps, args.warmup, args.examples = "smoke", 2, 1, 64
    if args.wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", args.wheels,
                        "trl", "datasets"], check=True)
    systems = args.systems.split(",") if args.systems else \
        [s for s in SYSTEMS if args.device == "cuda" or ("liger" not in s and "qlora" not in s)]
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        if not args.model:
            build_model_dir(args.shape, Path(work) / "model")
        workload = workload_of(args)
        results = {s: run_system(s, args) for s in systems}
    report(args, results, workload)
    return 0 if all("error" not in r for r in results.values()) else 1


def report(args: argparse.Namespace, results: dict, workload: list) -> None:
    import platform

    fpt = flops_per_token(shape_of(args), workload)
    peak = args.peak_tflops or (measured_matmul_tflops() if args.device == "cuda" else None)
    print(f"\n{'model ' + args.model if args.model else 'shape ' + args.shape}, {args.strategy}, device {args.device} ({platform.processor() or platform.machine()}), "
          f"{args.steps} timed steps after {args.warmup} warm-up, ~{args.tokens_per_step} real tokens per step, "
          f"{len(workload)} examples (mean {sum(len(p) + len(c) for p, c in workload) / len(workload):.0f} tokens)")
    # tunelab x: tunelab's tokens/s over the system's (tunelab_qlora's for the QLoRA systems); "tunelab" is the first
    # plain tunelab system listed (tunelab@bf16 where that comes first)
    plain = next((n for n in results if n.partition("@")[0] == "tunelab"), "tunelab")
    header = f"{'system':<18}{'tokens/s':>12}{'label tok/s':>13}{'tok/step':>10}{'peak MiB':>10}{'MFU':>8}{'tunelab x':>11}"
    print(header + "\n" + "-" * len(header))
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<18} failed: {r['error']}")
            continue
        qlora = "qlora" in name  # compared with tunelab's QLoRA; no weight gradients of the frozen base: 4N, not 6N
        base = results.get("tunelab_qlora" if qlora else plain, {})
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["label_tokens_per_s"] = r["label_tokens"] / r["seconds"]
        r["mfu"] = r["tokens_per_s"] * fpt * (4 / 6 if qlora else 1) / (peak * 1e12) if peak else None
        ratio = base.get("tokens", 0) / base.get("seconds", 1) / r["tokens_per_s"] if "seconds" in base else math.nan
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{name:<18}{r['tokens_per_s']:>12,.0f}{r['label_tokens_per_s']:>13,.0f}{r['tokens'] / r['steps']:>10,.0f}"
              f"{r['peak_memory_bytes'] / 2**20:>10,.0f}{mfu:>8}{ratio:>10.2f}x")
    if args.smoke:
        print("(smoke mode: a few steps of a tiny model; these figures are not measurements)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "work"},
                                               "flops_per_token": fpt, "peak_tflops": peak, "results": results}, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
