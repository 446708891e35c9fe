"""The prepared GPU check: correctness on the device first, then the throughput bench, in one run.

A GPU is lent to this project now and then, for minutes: this script is what to run then, and it runs
the same code paths on the CPU in seconds (`--device cpu --smoke`, in CI) so that it cannot rot.

1. Correctness on the device (each check records pass/fail, its figures and seconds; a failing check
   does not stop the others):
   - loss_equals_transformers: tunelab's loss and gradients against transformers' own loss on a real
     batch (fp32; and under bf16 autocast on CUDA);
   - packed_equals_padded: packed rows against padded batches, loss and gradients, for each attention
     path there is (tunelab_varlen, sdpa, flash_attention_2 where flash-attn is installed);
   - strategies_train: full, LoRA and a soft prompt train a few packed steps on the device
     (bf16 autocast and torch.compile where the device has them), with finite losses and a final/;
   - liger_equals_chunked: train.loss_kernel liger (liger-kernel's fused linear cross-entropy) gives the
     chunked kernel's loss and gradients (on the CPU: that it is refused, with the config error);
   - eval_on_device: a tuned run loaded on the device (bf16 weights where the GPU has bf16) scores and
     generates there;
   - fsdp2_one_process: torchrun with one process and FSDP2 gives the single-process losses;
   - qlora_equals_lora: QLoRA (an nf4 base) on the qwen2.5-0.5b shape: its step-1 loss equals LoRA's over the
     dequantized weights (within the precision's tolerance), and its loss, peak memory and tokens/s against LoRA
     over the unquantized base (bf16 autocast).
2. Throughput: bench/sft_throughput.py (qwen2.5-0.5b shape on CUDA) for tunelab, tunelab with the liger
   loss kernel, HF Trainer, TRL, TRL packing, TRL packing + Liger, and QLoRA (nf4 base, LoRA rank 16) by tunelab
   and by TRL + peft, with MFU and peak memory; then issue 31's comparison on SmolLM2-135M's shape (tunelab
   against TRL packing, LoRA and full).
3. One JSON and one markdown table in --out.

    python bench/gpu_check.py --device cuda --wheels .whl --out $OUT      # on the GPU machine
    python bench/gpu_check.py --device cpu --smoke --out /tmp/check      # anywhere, in seconds

`--wheels DIR` installs the wheels of DIR (made here by `make gpu-wheels`: TRL, datasets, liger-kernel
and what tunelab needs beyond the GPU image) into a private folder first, since the GPU machine has no
network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

def install_wheels(wheels: str) -> Path:
    """pip install the folder's wheels into a fresh folder (no index, no dependencies resolved: the folder is
    complete) and return it."""
    files = sorted(str(p) for p in Path(wheels).glob("*.whl"))
    if not files:
        raise SystemExit(f"--wheels {wheels}: no .whl files there (make gpu-wheels writes them)")
    site = Path(tempfile.mkdtemp(prefix="tunelab-gpu-site-"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(site), *files], check=True)
    return site


# ---------------------------------------------------------------- the workload of the checks

def make_check_data(work: Path, vocab: int, n: int) -> Path:
    """Pre-tokenized prompt/completion rows of varied lengths (so that rows pack several examples)."""
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(n):
        p, c = rng.randint(4, 40), rng.randint(2, 24)
        ids = [rng.randrange(4, vocab) for _ in range(p + c)]
        rows.append({"prompt_ids": ids[:p], "completion_ids": ids[p:]})
    path = work / "check.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config_tree(model_dir: Path, data: Path, out: Path, device: str, strategy: dict[str, Any],
                steps: int = 4) -> dict[str, Any]:
    return {"model": {"path": str(model_dir)}, "data": {"train": str(data), "max_length": 128},
            "strategy": strategy,
            "train": {"max_steps": steps, "learning_rate": 1e-3, "tokens_per_step": 1024, "seed": 0,
                      "progress": False, "device": device, "max_grad_norm": 1.0},
            "output_dir": str(out)}


def encoded_examples(model_dir: Path, data: Path) -> tuple[list[Any], Any]:
    from tunelab.config import validate_config
    from tunelab.data.dataset import load_datasets
    from tunelab.data.render import spec_from_config
    from tunelab.models.load import load_tokenizer

    cfg = validate_config(config_tree(model_dir, data, data.parent / "unused", "cpu", {"name": "full"}))
    tokenizer = load_tokenizer(cfg.model)
    train, _ = load_datasets(cfg.data, spec_from_config(cfg), tokenizer, 0)
    return train.encoded, tokenizer


# ---------------------------------------------------------------- comparisons

def gradients(model: Any) -> dict[str, Any]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def compare_gradients(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """The worst relative difference (|a - b| / |b|, as norms) and the lowest cosine over the parameters."""
    import torch

    worst, cosine = 0.0, 1.0
    for name, ga in a.items():
        gb = b[name]
        norm = float(gb.norm())
        if norm == 0:
            continue
        worst = max(worst, float((ga - gb).norm()) / norm)
        cosine = min(cosine, float(torch.nn.functional.cosine_similarity(ga.flatten(), gb.flatten(), dim=0)))
    return {"grad_rel_diff": worst, "grad_cosine": cosine}


def tolerances(dtype_name: str) -> dict[str, float]:
    """fp32 runs agree to rounding; bf16 autocast runs to bf16's 8 bits of mantissa, accumulated."""
    return {"loss_rel": 1e-5, "grad_rel": 1e-3} if dtype_name == "fp32" else {"loss_rel": 2e-2, "grad_rel": 0.1}


# ---------------------------------------------------------------- the checks

def check_loss_equals_transformers(ctx: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.data.batching import pad_collate
    from tunelab.train.loss import causal_lm_loss

    dev = ctx["device"]
    out: dict[str, Any] = {}
    batch = {k: v.to(dev) for k, v in pad_collate(ctx["encoded"][:8], 0).items()}
    for precision in ctx["precisions"]:
        model = AutoModelForCausalLM.from_pretrained(ctx["model_dir"], dtype=torch.float32).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            reference = model(**batch).loss
        reference.backward()
        ref_grads = gradients(model)
        model.zero_grad()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            result = causal_lm_loss(model, batch)
            ours = result.loss_sum / result.num_label_tokens
        ours.backward()
        ours, reference = ours.detach(), reference.detach()
        rel = abs(float(ours) - float(reference)) / abs(float(reference))
        figures = {"loss_tunelab": float(ours), "loss_transformers": float(reference), "loss_rel_diff": rel,
                   **compare_gradients(gradients(model), ref_grads)}
        tol = tolerances(precision)
        figures["ok"] = rel <= tol["loss_rel"] and figures["grad_rel_diff"] <= tol["grad_rel"]
        out[precision] = figures
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def attention_paths(dev: Any) -> list[str]:
    paths = ["tunelab_varlen", "sdpa"]
    if dev.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            paths.append("flash_attention_2")
        except ImportError:
            pass
    return paths


def check_packed_equals_padded(ctx: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    import tunelab.models.attention  # noqa: F401  (registers tunelab_varlen)
    from tunelab.data.batching import count_label_tokens, pack_best_fit, packed_collate, pad_collate
    from tunelab.train.loss import causal_lm_loss

    dev, encoded = ctx["device"], ctx["encoded"][:24]
    bins = pack_best_fit([len(e.input_ids) for e in encoded], 128)
    packed = {k: v.to(dev) for k, v in packed_collate([[encoded[i] for i in b] for b in bins], 0, 128).items()}
    padded = {k: v.to(dev) for k, v in pad_collate(encoded, 0).items()}
    out: dict[str, Any] = {"examples": len(encoded), "packed_rows": len(bins),
                           "label_tokens": count_label_tokens(padded["labels"])}
    precision = ctx["precisions"][-1]
    for attn in attention_paths(dev):
        model = AutoModelForCausalLM.from_pretrained(ctx["model_dir"], dtype=torch.float32,
                                                     attn_implementation=attn).to(dev)
        runs = []
        for batch in (padded, packed):
            model.zero_grad()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                result = causal_lm_loss(model, batch)
                loss = result.loss_sum / result.num_label_tokens
            loss.backward()
            runs.append((float(loss), gradients(model)))
        (loss_pad, g_pad), (loss_pack, g_pack) = runs
        rel = abs(loss_pack - loss_pad) / abs(loss_pad)
        figures = {"precision": precision, "loss_padded": loss_pad, "loss_packed": loss_pack, "loss_rel_diff": rel,
                   **compare_gradients(g_pack, g_pad)}
        tol = tolerances(precision)
        figures["ok"] = rel <= tol["loss_rel"] and figures["grad_rel_diff"] <= tol["grad_rel"]
        out[attn] = figures
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


STRATEGIES = {"full": {"name": "full"}, "lora": {"name": "lora", "lora": {"dropout": 0.0}},
              "soft_prompt": {"name": "soft_prompt", "soft_prompt": {"num_virtual_tokens": 8}}}


def check_strategies_train(ctx: dict[str, Any]) -> dict[str, Any]:
    import math

    from tunelab.config import validate_config
    from tunelab.train.loop import train
    from tunelab.runfiles import read_metrics

    out: dict[str, Any] = {}
    for name, strategy in STRATEGIES.items():
        run = ctx["work"] / f"run-{name}"
        lr = {"full": 1e-3, "lora": 5e-3, "soft_prompt": 3e-2}[name]
        tree = config_tree(ctx["model_dir"], ctx["data"], run, ctx["device"].type, strategy, steps=ctx["steps"])
        tree["train"]["learning_rate"] = lr
        t0 = time.perf_counter()
        train(validate_config(tree))
        rows = [r for r in read_metrics(run / "metrics.jsonl") if r["type"] == "train"]
        losses = [r["loss"] for r in rows]
        out[name] = {"losses": losses, "tokens_per_s": rows[-1]["tokens_per_s"], "seconds": time.perf_counter() - t0,
                     "final": (run / "final").is_dir(),
                     "ok": all(math.isfinite(x) for x in losses) and (run / "final").is_dir()}
    ctx["full_losses"] = out["full"]["losses"]
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def check_eval_on_device(ctx: dict[str, Any]) -> dict[str, Any]:
    import math

    import torch

    from tunelab.evaluate.generate import generate
    from tunelab.evaluate.loaders import load_for_eval
    from tunelab.evaluate.score import sequence_log_probs

    from tunelab.models.device import choose_device

    dev = ctx["device"]
    want_dtype = choose_device(dev.type).autocast_dtype or torch.float32  # eval.precision auto: bf16 where it is
    out: dict[str, Any] = {}
    for name in ("full", "lora", "soft_prompt"):
        em = load_for_eval(str(ctx["work"] / f"run-{name}"), device=str(dev))
        where = {p.device.type for p in em.model.parameters()}
        dtypes = {p.dtype for p in em.model.parameters()}
        t0 = time.perf_counter()
        scores = sequence_log_probs(em.model, ctx["encoded"][:16], 0)
        gens = generate(em, ["<s>"] * 4, max_new_tokens=8)
        out[name] = {"parameters_on": sorted(where), "dtypes": sorted(map(str, dtypes)),
                     "mean_log_prob": sum(s for s, _ in scores) / len(scores),
                     "generated_tokens": [g.num_tokens for g in gens], "seconds": time.perf_counter() - t0}
        out[name]["ok"] = where == {dev.type} and dtypes == {want_dtype} and \
            all(math.isfinite(s) for s, _ in scores) and len(gens) == 4
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def check_fsdp2_one_process(ctx: dict[str, Any]) -> dict[str, Any]:
    import yaml

    from tunelab.runfiles import read_metrics

    run = ctx["work"] / "run-fsdp2"
    tree = config_tree(ctx["model_dir"], ctx["data"], run, ctx["device"].type, STRATEGIES["full"], steps=ctx["steps"])
    tree["distributed"] = {"strategy": "fsdp2"}
    path = ctx["work"] / "fsdp2.yaml"
    path.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           "-m", "tunelab", "train", str(path)], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        return {"ok": False, "error": (proc.stderr or proc.stdout)[-1500:]}
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["type"] == "train"]
    single = ctx.get("full_losses")
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, single)) if single else None
    tol = tolerances(ctx["precisions"][-1])["loss_rel"]
    return {"losses": losses, "single_process_losses": single, "loss_rel_diff": worst,
            "ok": worst is not None and len(losses) == len(single) and worst <= tol}


def check_liger_equals_chunked(ctx: dict[str, Any]) -> dict[str, Any]:
    """train.loss_kernel liger against the chunked kernel: the same loss and gradients on a real batch (CUDA with
    liger-kernel installed); elsewhere, that training with it is refused with the config error, before any model
    loads."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.data.batching import pad_collate
    from tunelab.errors import ConfigError
    from tunelab.models.linear_cross_entropy import check_loss_kernel
    from tunelab.strategies.model import TrainModel

    dev = ctx["device"]
    if dev.type != "cuda" or importlib.util.find_spec("liger_kernel") is None:
        try:
            check_loss_kernel("liger", dev)
        except ConfigError as e:
            return {"ok": True, "refused": str(e)}
        return {"ok": False, "error": "loss_kernel liger was not refused where it cannot run"}
    batch = {k: v.to(dev) for k, v in pad_collate(ctx["encoded"][:8], 0).items()}
    out: dict[str, Any] = {}
    for precision in ctx["precisions"]:
        model = TrainModel(AutoModelForCausalLM.from_pretrained(ctx["model_dir"], dtype=torch.float32).to(dev), "full")
        runs = {}
        for kernel in ("chunked", "liger"):
            model.loss_kernel = kernel
            model.zero_grad()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss, n, _ = model(batch)
            (loss / n).backward()
            runs[kernel] = (float(loss) / n, gradients(model))
        rel = abs(runs["liger"][0] - runs["chunked"][0]) / abs(runs["chunked"][0])
        figures = {"loss_chunked": runs["chunked"][0], "loss_liger": runs["liger"][0], "loss_rel_diff": rel,
                   **compare_gradients(runs["liger"][1], runs["chunked"][1])}
        tol = tolerances(precision)
        figures["ok"] = rel <= tol["loss_rel"] and figures["grad_rel_diff"] <= tol["grad_rel"]
        out[precision] = figures
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def dequantized_copy(model_dir: Path, settings: Any, out: Path) -> Path:
    """`model_dir` with each linear layer's weight replaced by what its quantized layer computes with."""
    from transformers import AutoModelForCausalLM

    from tunelab.models.load import quantized_loading
    from tunelab.models.quantize import save_dequantized_copy

    quantized = AutoModelForCausalLM.from_pretrained(model_dir, **quantized_loading(settings, "cpu"))
    return save_dequantized_copy(quantized, model_dir, out)


def check_qlora_equals_lora(ctx: dict[str, Any]) -> dict[str, Any]:
    """QLoRA (nf4, double quantization, compute in bf16 on a GPU) on the qwen2.5-0.5b shape (the smoke shape on the
    CPU) against the same LoRA over the dequantized weights (step-1 loss within tolerances(): the quantized layers
    compute what the dequantized model does), and against LoRA over the unquantized base (bf16 autocast on a GPU):
    losses, peak memory and tokens/s of each."""
    import math

    import torch

    from sft_throughput import build_model_dir
    from tunelab.config import LoraSettings, validate_config
    from tunelab.train.loop import train
    from tunelab.runfiles import read_metrics

    dev = ctx["device"]
    model_dir = ctx["model_dir"] if dev.type == "cpu" else build_model_dir("qwen2.5-0.5b", ctx["work"] / "qwen0.5b")
    settings = LoraSettings(quantize="nf4")
    bases = {"qlora": model_dir, "lora_dequantized": dequantized_copy(model_dir, settings, ctx["work"] / "deq"),
             "lora": model_dir}
    precision = "bf16" if "bf16" in ctx["precisions"] else "fp32"
    out: dict[str, Any] = {"precision": precision}
    for name, base in bases.items():
        lora = {"quantize": "nf4"} if name == "qlora" else {}
        tree = config_tree(base, ctx["data"], ctx["work"] / f"qlora-check-{name}", dev.type,
                           {"name": "lora", "lora": {**lora, "dropout": 0.0}}, steps=ctx["steps"])
        tree["train"].update(learning_rate=5e-3, precision=precision)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        train(validate_config(tree))
        rows = read_metrics(ctx["work"] / f"qlora-check-{name}" / "metrics.jsonl")
        steps = [r for r in rows if r["type"] == "train"]
        out[name] = {"losses": [r["loss"] for r in steps],
                     "peak_memory_bytes": next(r for r in rows if r["type"] == "summary")["peak_memory_bytes"],
                     "tokens_per_s": sum(r["num_tokens"] for r in steps[1:]) / max(1e-9, sum(r["seconds"]
                                                                                                for r in steps[1:]))}
    q, d, f = out["qlora"], out["lora_dequantized"], out["lora"]
    out["loss_rel_diff"] = abs(q["losses"][0] - d["losses"][0]) / d["losses"][0]
    out["loss_rel_diff_unquantized"] = abs(q["losses"][0] - f["losses"][0]) / f["losses"][0]
    out["memory_vs_lora"] = q["peak_memory_bytes"] / f["peak_memory_bytes"]
    out["speed_vs_lora"] = q["tokens_per_s"] / f["tokens_per_s"]
    out["ok"] = out["loss_rel_diff"] <= tolerances(precision)["loss_rel"] and \
        all(math.isfinite(x) for r in (q, d, f) for x in r["losses"]) and q["losses"][-1] < q["losses"][0]
    return out


CHECKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "loss_equals_transformers": check_loss_equals_transformers,
    "packed_equals_padded": check_packed_equals_padded,
    "strategies_train": check_strategies_train,
    "liger_equals_chunked": check_liger_equals_chunked,
    "eval_on_device": check_eval_on_device,
    "fsdp2_one_process": check_fsdp2_one_process,
    "qlora_equals_lora": check_qlora_equals_lora,
}


def run_checks(ctx: dict[str, Any], names: list[str]) -> dict[str, Any]:
    results = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            result = CHECKS[name](ctx)
        except Exception:  # a failing check is recorded, and the others still run
            result = {"ok": False, "error": traceback.format_exc()[-2000:]}
        result["seconds"] = time.perf_counter() - t0
        results[name] = result
        print(f"check {name}: {'ok' if result['ok'] else 'FAILED'} ({result['seconds']:.1f} s)", flush=True)
        if not result["ok"]:
            print(json.dumps(result, indent=1)[-3000:], flush=True)
    return results


def run_throughput(args: argparse.Namespace, out: Path, name: str = "throughput", extra: list[str] = ()
                   ) -> dict[str, Any]:
    """One bench/sft_throughput.py run (its JSON in out/NAME.json): --shape's comparison, or `extra`'s."""
    cmd = [sys.executable, str(ROOT / "bench" / "sft_throughput.py"), "--json", str(out / f"{name}.json")]
    cmd += ["--smoke"] if args.smoke else ["--shape", args.shape, "--device", args.device, "--steps", str(args.bench_steps)]
    cmd += list(extra)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    print(proc.stdout[-4000:], flush=True)
    result: dict[str, Any] = {"seconds": time.perf_counter() - t0, "exit_code": proc.returncode}
    if (out / f"{name}.json").is_file():
        result.update(json.loads((out / f"{name}.json").read_text()))
    else:
        result["error"] = proc.stderr[-2000:]
    return result


def run_smollm2(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Issue 31's comparison on SmolLM2-135M's shape, LoRA and full: tunelab against TRL packing (in smoke mode
    one tunelab LoRA run on the smoke shape, so that the path runs)."""
    if args.smoke:
        return {"lora": run_throughput(args, out, "throughput-smollm2-lora", ["--systems", "tunelab", "--strategy",
                                                                            "lora"])}
    return {strategy: run_throughput(args, out, f"throughput-smollm2-{strategy}",
                                     ["--shape", "smollm2-135m", "--systems", "tunelab,trl_packed", "--strategy",
                                      strategy])
            for strategy in ("lora", "full")}


def environment(dev: Any) -> dict[str, Any]:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": str(dev), "processor": platform.processor() or platform.machine()}
    if dev.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(dev), bf16=torch.cuda.is_bf16_supported(),
                   memory_gib=torch.cuda.get_device_properties(dev).total_memory / 2**30)
    for module in ("flash_attn", "liger_kernel", "trl", "datasets", "peft"):
        try:
            env[module] = __import__(module).__version__
        except Exception:  # absent (or broken): the check says so instead of failing
            env[module] = None
    if os.environ.get("TUNELAB_GPU_SITE"):  # what --wheels installed
        env["carried"] = sorted(p.name for p in Path(os.environ["TUNELAB_GPU_SITE"]).glob("*.dist-info"))
    return env


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# tunelab GPU check: {env.get('gpu', env['processor'])}", "",
             f"torch {env['torch']}, transformers {env['transformers']}, device {env['device']}"
             f"{' (smoke: a tiny model, no measurements)' if report['smoke'] else ''}", "",
             "| check | result | figures | seconds |", "| --- | --- | --- | --- |"]
    for name, r in report["checks"].items():
        figures = ", ".join(f"{k} {v.get('loss_rel_diff', 0):.2g}" for k, v in r.items()
                            if isinstance(v, dict) and "loss_rel_diff" in v) or \
            (f"loss rel diff {r['loss_rel_diff']:.2g}" if isinstance(r.get("loss_rel_diff"), float) else "")
        lines.append(f"| {name} | {'ok' if r['ok'] else 'FAILED'} | {figures} | {r['seconds']:.1f} |")
    runs = [report.get("throughput") or {}, *(report.get("throughput_smollm2") or {}).values()]
    for t in (t for t in runs if t.get("results")):
        lines += ["", f"Throughput ({t['args'].get('shape')}, {t['args'].get('strategy')}, {t['args'].get('device')}):",
                  "", "| system | tokens/s | peak MiB | MFU | tunelab x |", "| --- | --- | --- | --- | --- |"]
        for name, r in t["results"].items():
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error'][:80]} | | | |")
                continue
            base = t["results"].get("tunelab_qlora" if "qlora" in name else "tunelab", {})  # like against like
            ratio = base.get("tokens_per_s", 0) / r["tokens_per_s"] if r.get("tokens_per_s") else float("nan")
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['peak_memory_bytes'] / 2**20:,.0f} | {mfu} | "
                         f"{ratio:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every path runs (CI)")
    parser.add_argument("--wheels", help="a folder of wheels to install first (the GPU machine has no network)")
    parser.add_argument("--out", default="gpu-check", help="where gpu_check.json and gpu_check.md go")
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated subset of the checks")
    parser.add_argument("--no-throughput", action="store_true", help="the correctness checks only")
    parser.add_argument("--shape", default="qwen2.5-0.5b", help="the throughput bench's model shape")
    parser.add_argument("--bench-steps", type=int, default=20)
    args = parser.parse_args()
    if args.wheels and not os.environ.get("TUNELAB_GPU_SITE"):
        site = install_wheels(args.wheels)  # then again as a process that sees them (and hands them to its children)
        env = {**os.environ, "TUNELAB_GPU_SITE": str(site),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
        try:
            return subprocess.run([sys.executable, *sys.argv], env=env).returncode
        finally:
            shutil.rmtree(site, ignore_errors=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from sft_throughput import SHAPES, build_model_dir

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device (use --device cpu --smoke on a CPU)")
    dev = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shape = "smoke" if args.smoke or dev.type == "cpu" else "tiny"
        model_dir = build_model_dir(shape, work / "model")
        data = make_check_data(work, SHAPES[shape]["vocab_size"], 64)
        encoded, _ = encoded_examples(model_dir, data)
        bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        ctx = {"device": dev, "work": work, "model_dir": model_dir, "data": data, "encoded": encoded,
               "precisions": ["fp32", "bf16"] if bf16 else ["fp32"], "steps": 3 if args.smoke else 6}
        checks = run_checks(ctx, args.checks.split(","))
    report = {"environment": environment(dev), "smoke": args.smoke, "checks": checks,
              "checks_seconds": time.perf_counter() - started}
    if not args.no_throughput:
        report["throughput"] = run_throughput(args, out)
        report["throughput_smollm2"] = run_smollm2(args, out)
    report["seconds"] = time.perf_counter() - started
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"written: {out / 'gpu_check.json'}, {out / 'gpu_check.md'} ({report['seconds']:.0f} s)")
    throughput_ok = args.no_throughput or all(t.get("exit_code") == 0 for t in [
        report["throughput"], *report["throughput_smollm2"].values()])
    return 0 if all(c["ok"] for c in checks.values()) and throughput_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
