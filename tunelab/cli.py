"""The `tunelab` command: parse arguments, load the config, call the parts. No logic of its own."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from tunelab.errors import RunFault, TunelabError

log = logging.getLogger("tunelab")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (it may be replaced after set-up)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging() -> None:
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("tunelab: %(message)s"))
        log.addHandler(handler)
    log.propagate = False  # a library's logging.basicConfig must not print every line twice
    log.setLevel(logging.INFO)
    for noisy in ("transformers", "torch", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def launch_torchrun(args: argparse.Namespace) -> int:
    """`tunelab train --nproc N`: run the same command under torchrun, one process per device."""
    import re
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "tunelab", "train", args.config, *args.overrides]
    cmd += ["--resume"] if args.resume else []
    cmd += ["--overwrite"] if args.overwrite else []
    proc = subprocess.Popen(cmd, stdout=None, stderr=subprocess.PIPE, text=True)
    tail: list[str] = []
    for line in proc.stderr:  # pass everything through, keep the end for the failure report
        sys.stderr.write(line)
        tail = (tail + [line])[-200:]
    code = proc.wait()
    if code != 0:
        text = "".join(tail)
        root = text.split("Root Cause", 1)[-1]  # torchrun's report of the first failure
        rank = re.search(r"rank: (\d+)", root) or re.search(r"error \(rank (\d+)\)", text)
        signal = re.search(r"Signal \d+ \((\w+)\)", root)
        why = f" ({signal.group(1)})" if signal else ""
        who = f"rank {rank.group(1)}" if rank else "a training process"
        print(f"tunelab: error: {who} failed{why}, so torchrun stopped the whole job (exit code {code}); "
              "the messages above say why. Continue from the last checkpoint with --resume.", file=sys.stderr)
        return 2
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from tunelab.config import load_config
    from tunelab.train.loop import train

    if args.nproc and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        load_config(args.config, args.overrides)  # refuse a bad config before starting any process
        return launch_torchrun(args)
    extra = {}
    if args.resume:
        extra["resume"] = True
    if args.overwrite:
        extra["overwrite"] = True
    cfg = load_config(args.config, args.overrides, extra)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports for the job
    summary = f"final train loss {result.final_loss:.4f}"
    if result.eval:
        summary += f", eval loss {result.eval['eval_loss']:.4f}"
    if result.final_dir is None:
        print(f"tuning-free prompting: nothing was trained; eval loss {result.eval['eval_loss']:.4f}"
              if result.eval else "tuning-free prompting: nothing was trained and there is no eval data")
        return 0
    from tunelab.report.run_report import report_run

    print(f"{summary}\nmodel: {result.final_dir}\nmetrics: {result.run_dir / 'metrics.jsonl'}\n"
          f"report: {report_run(result.run_dir)}")
    return 0


def cmd_convert_llama2c(args: argparse.Namespace) -> int:
    from tunelab.models.llama2c import convert_llama2c

    out = convert_llama2c(Path(args.model), Path(args.tokenizer), Path(args.out_dir))
    print(f"wrote a Hugging Face Llama folder to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from tunelab.config import TrainConfig
    from tunelab.demo import run_demo
    from tunelab.train.loop import set_denormal_mode

    # as compare does, before anything computes: the demo trains prompting runs in this process, and a flag set
    # then would reach only the calling thread, not the intra-op threads the base model's evaluation started
    set_denormal_mode(TrainConfig(), torch.device("cpu"))
    run_demo(Path(args.out), quick=args.quick, steps=args.steps)
    return 0


# flag -> key of the config's eval: section (a flag given on the command line overrides the key)
EVAL_FLAGS = {"mode": "mode", "metric": "metrics", "max_new_tokens": "max_new_tokens", "sample": "do_sample",
              "temperature": "temperature", "top_p": "top_p", "stop": "stop_strings", "batch_size": "batch_size",
              "max_examples": "max_examples", "seed": "seed", "device": "device", "precision": "precision"}
DIFF_FLAGS = {"reference_text": "reference_text", "probes": "probes", "seed": "seed"}


def _section_with_flags(section: Any, flags: dict[str, str], args: argparse.Namespace, key: str) -> Any:
    """A config section (eval: or diff:) with the flags the command line gave, validated."""
    from tunelab.config import validate_section

    given = {field: getattr(args, flag) for flag, field in flags.items() if getattr(args, flag, None) is not None}
    return validate_section(type(section), {**section.model_dump(), **given}, key, "the command line")


def _settings(args: argparse.Namespace, cfg: Any = None) -> tuple[Any, Any]:
    """(eval, diff) settings: the config's eval: and diff: sections (a run's, --config's, or the defaults), then the
    command line's flags over them."""
    from tunelab.config import DiffConfig, EvalConfig, load_config

    if cfg is None and getattr(args, "config", None) and args.config.endswith((".yaml", ".yml")):
        cfg = load_config(args.config)
    eval_cfg, diff_cfg = (cfg.eval, cfg.diff) if cfg is not None else (EvalConfig(), DiffConfig())
    return _section_with_flags(eval_cfg, EVAL_FLAGS, args, "eval"), _section_with_flags(diff_cfg, DIFF_FLAGS, args,
                                                                                         "diff")


def _device_flags(args: argparse.Namespace, path: str) -> dict[str, str | None]:
    """Where the model of `path` runs, in the order _settings resolves the eval: section: --device and
    --precision, else a run directory's own eval: section (None: the loader reads it), else --config's."""
    from tunelab.config import load_config

    flags = {key: getattr(args, key, None) for key in ("device", "precision")}
    if (Path(path) / "config.yaml").is_file() or not (getattr(args, "config", None) or "").endswith((".yaml", ".yml")):
        return flags
    cfg = load_config(args.config)
    return {key: value or getattr(cfg.eval, key) for key, value in flags.items()}


def _eval_data(args: argparse.Namespace, em: Any, settings: Any) -> Any:
    """Render the data as the run did (a run directory), as a config says (--config), or from the flags."""
    from tunelab.config import DataConfig, Template, load_config
    from tunelab.data.render import RenderSpec, spec_from_config
    from tunelab.evaluate.run import load_eval_data

    cfg = em.run_config or (load_config(args.config) if args.config else None)
    if cfg is not None:
        data_cfg = cfg.data.model_copy(update={"max_examples": None})
        return load_eval_data(args.data, data_cfg, spec_from_config(cfg), cfg.data.train_path, settings.max_examples,
                              settings.seed)
    columns = dict(c.split("=", 1) for c in args.column or [])
    data_cfg = DataConfig(train=args.data, format=args.format, columns=columns, max_length=args.max_length)
    template = Template(prompt=args.template, target=args.target_template) if args.template else None
    spec = RenderSpec(template=template, num_shots=args.num_shots, seed=settings.seed)
    return load_eval_data(args.data, data_cfg, spec, args.train_file, settings.max_examples, settings.seed)


def cmd_eval(args: argparse.Namespace) -> int:
    from tunelab.evaluate.baselines import describe
    from tunelab.evaluate.loaders import load_for_eval
    from tunelab.evaluate.run import evaluate, write_outputs

    em = load_for_eval(args.model, args.adapter, **_device_flags(args, args.model))
    settings = _settings(args, em.run_config)[0]
    summary, rows = evaluate(em, _eval_data(args, em, settings), settings)
    write_outputs(summary, rows, args.output, args.predictions)
    print(f"{summary['num_examples']} examples ({summary['mode']}): " +
          ", ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items()))
    print(describe(summary["baselines"]))
    return 0


def _run_inputs(path: str, args: argparse.Namespace) -> tuple[Any, Any]:
    """The run's model and its training data's rendering, for new inputs (a plain model: its own chat template)."""
    from tunelab.data.render import turn_end
    from tunelab.evaluate.inputs import Inputs
    from tunelab.evaluate.loaders import load_for_eval

    em = load_for_eval(path, **_device_flags(args, path))
    inputs = Inputs(em.run_config)
    if em.run_config is None:  # a plain model: its chat template's end of turn ends a reply, as a run's does
        em.stop_texts = [turn_end(inputs.spec, em.tokenizer, True)]
    return em, inputs


def cmd_chat(args: argparse.Namespace) -> int:
    from tunelab.evaluate.chat import chat_loop

    em, inputs = _run_inputs(args.model, args)
    chat_loop(em, inputs, sys.stdin, sys.stdout, args.max_new_tokens, args.sample, args.temperature, args.top_p,
              args.seed, args.show_prompt, args.system or "", args.stop or [])
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import json

    from tunelab.errors import ConfigError
    from tunelab.evaluate.generate import generate

    em, inputs = _run_inputs(args.model, args)
    examples = inputs.from_texts(args.prompt or []) + (inputs.from_file(args.file) if args.file else [])
    if not examples:
        raise ConfigError("nothing to generate from: give --prompt TEXT (repeatable) or --file RECORDS.")
    prompts = inputs.prompts(examples, em.tokenizer)
    gens = generate(em, prompts, args.max_new_tokens, args.sample, args.temperature, args.top_p, args.stop or [],
                    args.batch_size, args.seed)
    lines = [json.dumps({"source": ex.source, "prompt": prompt, "output": g.text, "ended_with_eos": g.ended_with_eos,
                         "num_tokens": g.num_tokens}) for ex, prompt, g in zip(examples, prompts, gens)]
    if args.output:
        Path(args.output).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        print(f"{len(lines)} generations: {args.output}")
    else:
        print("\n".join(lines))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    import json

    from tunelab.evaluate.diff import diff
    from tunelab.evaluate.loaders import load_for_eval
    from tunelab.report.run_report import report_run

    tuned = load_for_eval(args.tuned, **_device_flags(args, args.tuned))
    # the base where the tuned model runs, in its precision: the same arithmetic on both sides of every figure
    base = load_for_eval(args.base, device=tuned.device_setting, precision=tuned.precision_setting)
    eval_settings, diff_settings = _settings(args, tuned.run_config)
    data = _eval_data(args, tuned, eval_settings) if args.data else None
    result = diff(base, tuned, data, diff_settings, eval_settings)
    out = Path(args.output) if args.output else Path(args.tuned) / "diff.json"
    out.write_text(json.dumps(result, indent=2))
    for section in ("task", "forgetting", "probes", "drift"):
        for key, value in result.get(section, {}).items():
            if key.endswith("verdict"):
                print(f"{section}: {value['text']}")
    off = result.get("forgetting", {}).get("adaptation_off")
    if off:  # a soft prompt or an adapter: the base is kept, and this is the figure a user of it relies on
        print(f"forgetting with the adaptation off: {off['verdict']['text']} (ranked by: "
              f"{result['forgetting']['ranked_by']})")
    print(f"diff: {out}\nreport: {report_run(out.parent)}")
    return 0


DEFAULT_COMPARE = "prompting,soft_prompt,lora,full"


def cmd_compare(args: argparse.Namespace) -> int:
    from tunelab.compare import compare
    from tunelab.config import load_config
    from tunelab.evaluate.baselines import describe
    from tunelab.report.page import fmt
    from tunelab.report.run_report import COMPARE_LABELS, report_run
    from tunelab.train.loop import resolve_device, set_denormal_mode

    cfg = load_config(args.config, args.overrides)
    # before the base model's evaluation runs anything: every intra-op thread copies the flag when it starts
    set_denormal_mode(cfg.train, resolve_device(cfg.train)[0])
    out = Path(args.out or Path(cfg.output_dir).with_name(Path(cfg.output_dir).name + "-compare"))
    per_strategy: dict[str, list[str]] = {}
    for item in args.set or []:
        name, sep, override = item.partition(":")
        if not sep:
            from tunelab.errors import ConfigError

            raise ConfigError(f"--set '{item}' must look like STRATEGY:dotted.key=value, e.g. lora:train.learning_rate=1e-2")
        per_strategy.setdefault(name, []).append(override)
    eval_settings, diff_settings = _settings(args, cfg)
    cfg = cfg.model_copy(update={"eval": eval_settings, "diff": diff_settings})
    strategies = args.strategies.split(",") if args.strategies else DEFAULT_COMPARE.split(",")
    if args.preset:
        from tunelab.compare import PRESETS, apply_preset

        cfg, preset_strategies, per_strategy = apply_preset(cfg, PRESETS[args.preset], per_strategy)
        strategies = strategies if args.strategies else preset_strategies
        print(f"preset {args.preset}: {PRESETS[args.preset].about}")
    result = compare(cfg, strategies, out, per_strategy)
    cols = ["strategy", "trainable_params", "wall_time_s", "train_flops", "peak_memory_mib", "tokens_per_s",
            "eval_loss", result["metric"], "perplexity_ratio", "perplexity_ratio_off", "kl_base_to_tuned"]
    print("  ".join(f"{COMPARE_LABELS.get(c, c):>14}" for c in cols))
    for row in result["table"]:
        print("  ".join(f"{fmt(row.get(c)):>14}" for c in cols))
    print(describe(result["baselines"]))
    print(result["recommendation"])
    print(result["forgetting_ranked_by"])
    print(f"report: {report_run(out, 'tunelab compare')}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tunelab.report.run_report import report_run

    print(report_run(Path(args.run_dir)))
    return 0


def _add_cache_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-cache", action="store_true", help="encode the data afresh and keep no on-disk copy "
                   "(data.cache: false)")


def _add_decoding_flags(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """Decoding flags; without `defaults` an absent flag is None, so that the config's eval: section decides."""
    def value(v: Any) -> Any:
        return v if defaults else None

    p.add_argument("--max-new-tokens", type=int, default=value(64))
    p.add_argument("--sample", action="store_true", default=value(False), help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=value(1.0))
    p.add_argument("--top-p", type=float, default=value(1.0))
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--batch-size", type=int, default=value(16))
    p.add_argument("--seed", type=int, default=value(0))


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], help="where the model runs (default: eval.device, "
                   "auto: a GPU when there is one)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="the weights' precision (default: "
                   "eval.precision, auto: bf16 on a GPU that has it, else fp32)")


def _add_eval_flags(p: argparse.ArgumentParser, data_positional: bool = True) -> None:
    if data_positional:
        p.add_argument("data", help="labeled data in any format training reads")
    p.add_argument("--metric", action="append", help="exact_match, accuracy, macro_f1, token_f1, rouge_l, bleu, "
                   "numeric_match (repeatable; default: by task)")
    p.add_argument("--mode", choices=["auto", "generate", "score"],
                   help="score: rank the label options by log-likelihood; generate: free text (default: eval.mode)")
    _add_decoding_flags(p, defaults=False)  # absent flags: the config's eval: section
    _add_device_flags(p)
    p.add_argument("--max-examples", type=int, help="a seeded sample of the data")
    p.add_argument("--config", help="render the data as this training config says")
    p.add_argument("--template", help="a discrete prompt template, e.g. '{text}\nIntent:'")
    p.add_argument("--target-template", default="{target}")
    p.add_argument("--num-shots", type=int, default=0)
    p.add_argument("--train-file", help="where few-shot demonstrations and label options come from")
    p.add_argument("--format", default="auto")
    p.add_argument("--column", action="append", help="canonical=file_column, e.g. label=category")
    p.add_argument("--max-length", type=int, default=1024)


def cmd_data_check(args: argparse.Namespace) -> int:
    import json

    from tunelab.config import DataConfig, ModelConfig, load_config
    from tunelab.data.audit import audit
    from tunelab.data.render import RenderSpec, spec_from_config
    from tunelab.errors import ConfigError
    from tunelab.models.load import load_tokenizer
    from tunelab.report.data_report import write_data_report

    cfg = None
    if args.target.endswith((".yaml", ".yml")):
        cfg = load_config(args.target, args.overrides)
        spec, model_cfg, eval_path = spec_from_config(cfg), cfg.model, args.eval or cfg.data.eval
        files = [(s.path, cfg.data.model_copy(update={"train": s.path, "format": s.format, "columns": s.columns,
                                                       "column_names": s.column_names})) for s in cfg.data.sources()]
        report_dir = Path(cfg.output_dir)
    else:
        if not args.model:
            raise ConfigError("checking a data file needs --model (its tokenizer decides lengths and the label mask), "
                              "or pass a training config instead.")
        columns = dict(c.split("=", 1) for c in args.column or [])
        files = [(args.target, DataConfig(train=args.target, format=args.format, columns=columns,
                                          max_length=args.max_length))]
        spec, model_cfg, eval_path, report_dir = RenderSpec(), ModelConfig(path=args.model), args.eval, Path(".")
    if args.fix and len(files) > 1:
        raise ConfigError("--fix writes a cleaned copy of one data file, and data.train is a mixture: check each file "
                          "on its own (tunelab data check FILE --model M --fix NEW_FILE).")
    if args.fix and Path(args.fix).resolve() == Path(files[0][0]).resolve():
        raise ConfigError("--fix must name a new file: tunelab never rewrites the original data.")
    tokenizer = load_tokenizer(model_cfg)
    results = [audit(path, data_cfg, spec, tokenizer, eval_path, args.threshold, args.preview)
               for path, data_cfg in files]
    report_root = Path(args.output).parent if args.output else report_dir
    for i, ((path, _), result) in enumerate(zip(files, results)):
        _print_audit(result, path)
        report = write_data_report(result, report_root, stem=f"data-check-{i + 1}" if len(files) > 1 else "data-check")
        print(f"report: {report}")
    shares: dict[str, int] = {}
    if cfg is not None and not any(r["blocking"] for r in results):
        from tunelab.data.dataset import load_datasets

        # as training will read it: from the encoded cache when an entry has this encoding (else encoded into it)
        train, _ = load_datasets(cfg.data, spec, tokenizer, cfg.train.seed)
        shares = train.shares
        for path, n in shares.items():
            print(f"{path}: {n} examples an epoch ({100 * n / max(1, train.num_chosen):.1f}%)")
    if args.output:
        out = results[0] if len(results) == 1 else {"sources": results, "shares": shares}
        Path(args.output).write_text(json.dumps(out, indent=2))
    if args.fix:
        from tunelab.data.audit import rows_to_drop
        from tunelab.data.read import read_records

        out_file, (path, data_cfg) = Path(args.fix), files[0]
        drop = rows_to_drop(results[0])
        kept = [r.fields for r in read_records(path, data_cfg.column_names) if r.row not in drop]
        out_file.write_text("".join(json.dumps(f, ensure_ascii=False) + "\n" for f in kept))
        print(f"--fix: wrote {len(kept)} records to {out_file} ({len(drop)} dropped)")
    blocking = sorted({k for r in results for k in r["blocking"]})
    if blocking:
        print(f"blocking: {', '.join(blocking)}")
        return 1
    return 0


def _print_audit(result: dict[str, Any], path: str) -> None:
    from tunelab.data.audit import terminal_preview

    order = {"blocking": 0, "warning": 1, "info": 2}
    keys = [k for k, v in result.items() if isinstance(v, dict) and "severity" in v]
    print(f"{result['num_examples']} examples of {result['num_records']} records in {path}")
    for key in sorted(keys, key=lambda k: order[result[k]["severity"]]):
        f = result[key]
        if f["count"] or key == "label_balance":
            print(f"[{f['severity']}] {key}: {f['count']} rows. {f['message']}")
    for item in result["preview"]:
        print(f"--- row {item['row']} (trained tokens in green)\n{terminal_preview(item)}")

def cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from tunelab.doctor import diagnose

    result = diagnose(Path(args.run_dir))
    for f in result["findings"]:
        print(f"[{f['severity']}] {f['what']}\n  evidence: {f['evidence']}\n  why: {f['why']}\n  fix: {f['fix']}")
    print(result["summary"])
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return 1 if any(f["severity"] == "error" for f in result["findings"]) else 0


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2g}s" if seconds < 10 else f"{seconds:.0f}s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def cmd_plan(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.plan.run import plan, write_plan

    cfg = load_config(args.config, args.overrides)
    compare_json = Path(cfg.output_dir).with_name(Path(cfg.output_dir).name + "-compare") / "compare.json"
    timer = None
    if args.measure:  # plan/ runs no model itself: the training side's step timer is handed to it
        from tunelab.train.timing import measured_step_seconds as timer
    for gpu in args.gpu or ["cpu"]:
        result = plan(cfg, gpu, args.pretraining_tokens, compare_json=compare_json, step_timer=timer)
        print(f"device: {result.device.name}, {result.device.memory_bytes / 2**30:.0f} GiB, "
              f"{result.device.peak_flops / 1e12:.3g} TFLOP/s peak, MFU {result.device.mfu:.0%} ({result.device.source})")
        d = result.data
        print(f"data: {d.num_examples:,} examples, {d.num_tokens:,} tokens, {d.num_label_tokens:,} target tokens "
              f"(mean length {d.mean_length:.0f})")
        head = f"{'strategy':<12}{'trainable':>14}{'share':>9}{'adapter MiB':>12}{'memory GiB':>11}{'fits':>6}" \
               f"{'TFLOP':>10}{'time':>10}{'of pre-training':>17}"
        print(head + "\n" + "-" * len(head))
        for name, e in result.estimates.items():
            mem = e.memory_bytes["total"] / 2**30
            pre = f"{100 * e.flops / (6 * e.total_params * result.pretraining[0]):.2g}%" if result.pretraining else "-"
            mark = "*" if name == result.config_strategy else " "
            print(f"{mark}{name:<11}{e.trainable_params:>14,}{100 * e.trainable_params / e.total_params:>8.3g}%"
                  f"{e.adapter_bytes / 2**20:>12.2f}{mem:>11.3f}{'yes' if e.memory_bytes['total'] <= result.device.memory_bytes else 'NO':>6}"
                  f"{e.flops / 1e12:>10.3g}{_duration(e.seconds):>10}{pre:>17}")
        chosen = result.estimates[result.config_strategy]
        print("memory of " + result.config_strategy + ": " +
              ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in chosen.memory_bytes.items()))
        print(f"time of {result.config_strategy}: {chosen.step_seconds:.3g} s per step ({chosen.time_source})")
        if chosen.fit_changes:
            print(f"{result.config_strategy} does not fit {result.device.name} "
                  f"({chosen.memory_bytes['total'] / 2**30:.1f} of {result.device.memory_bytes / 2**30:.0f} GiB); "
                  "to fit, change one of:\n" + "\n".join(f"  - {c}" for c in chosen.fit_changes))
        if result.pretraining:
            e = result.estimates[result.config_strategy]
            share = e.flops / (6 * e.total_params * result.pretraining[0])
            print(f"this fine-tune ({result.config_strategy}) costs {100 * share:.2g}% of pre-training "
                  f"({result.pretraining[0]:.3g} tokens: {result.pretraining[1]})")
        from tunelab.plan.run import VALIDATED_ERROR

        print(f"estimate error: {VALIDATED_ERROR}")
        a = result.advice
        print(f"recommendation: {a.strategy} {a.settings}\n  {a.reasons}")
        if args.output:
            out = Path(args.output)
            write_plan(result, str(out if len(args.gpu or []) < 2 else out.with_name(f"{out.stem}-{gpu}{out.suffix}")))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tunelab.evaluate.inputs import quantized_run_settings
    from tunelab.strategies.export import export_run

    quantized, prompts = quantized_run_settings(Path(args.run_dir)) if args.merge else (None, [])
    print(f"{export_run(Path(args.run_dir), Path(args.out_dir), args.merge, quantized, prompts)}: {args.out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description="Fine-tune a causal LM on labeled examples.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a model as a YAML config says")
    p.add_argument("config", help="the YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=50")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete the run in output_dir and start again")
    p.add_argument("--nproc", type=int, help="data-parallel processes (runs torchrun --nproc_per_node N)")
    _add_cache_flag(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a model (HF folder, adapter folder or run directory) on labeled data")
    p.add_argument("model")
    _add_eval_flags(p)
    p.add_argument("--adapter", help="a peft adapter folder to load onto MODEL")
    p.add_argument("--output", help="write the JSON summary here")
    p.add_argument("--predictions", help="write one JSON line per example here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("chat", help="talk to a tuned run (each turn rendered as its training data was) or a model")
    p.add_argument("model", help="a tunelab run directory, or a model folder (its own chat template renders the turns)")
    p.add_argument("--system", help="a system prompt (also: /system TEXT while chatting)")
    p.add_argument("--show-prompt", action="store_true", help="print the exact text the model continues")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", help="a stop string (repeatable), besides EOS and the end of turn")
    p.add_argument("--seed", type=int, default=0)
    _add_device_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="continue new inputs with a tuned run, rendered as its training data was")
    p.add_argument("model", help="a tunelab run directory, or a model folder (inputs are user turns of its chat "
                   "template)")
    p.add_argument("--prompt", action="append", help="a text for the prompt field (repeatable)")
    p.add_argument("--file", help="records in the training data's shape and columns; targets may be absent")
    p.add_argument("--output", help="write one JSON line per input here (default: standard output)")
    _add_decoding_flags(p)
    _add_device_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("diff", help="the tuned model against its base: task gain, forgetting, drift")
    p.add_argument("base")
    p.add_argument("tuned")
    p.add_argument("--data", help="eval data for the task metric")
    _add_eval_flags(p, data_positional=False)
    p.add_argument("--reference-text", help="general text for perplexity and KL (default: samples of the base)")
    p.add_argument("--probes", help="JSONL of {prompt, answer} general-knowledge probes")
    p.add_argument("--output", help="where diff.json goes (default: TUNED/diff.json)")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("compare", help="train, evaluate and diff several strategies on the same budget")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    _add_cache_flag(p)
    p.add_argument("--strategies", help=f"comma-separated, LABEL=STRATEGY for a labelled variant (default: "
                   f"{DEFAULT_COMPARE}, or the preset's)")
    p.add_argument("--preset", choices=["small-data"], help="small-data: 64 examples, every strategy (zero- and "
                   "few-shot prompting, soft prompt, LoRA, IA3, freeze, full, prompt+LM)")
    p.add_argument("--set", action="append", help="STRATEGY:dotted.key=value for one strategy (repeatable)")
    p.add_argument("--out", help="where the comparison goes (default: OUTPUT_DIR-compare)")
    _add_eval_flags(p, data_positional=False)
    p.add_argument("--reference-text")
    p.add_argument("--probes")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="write report.html and report.md for a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("plan", help="estimate cost and memory per strategy, and recommend one")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    _add_cache_flag(p)
    p.add_argument("--gpu", action="append", help="h100, a100, l4 or cpu (repeatable; default: this CPU)")
    p.add_argument("--pretraining-tokens", type=float, help="tokens the base model was pre-trained on")
    p.add_argument("--output", help="write the figures here (plan.json; with several --gpu, plan-GPU.json beside it)")
    p.add_argument("--measure", action="store_true",
                   help="on the CPU, time real optimizer steps of cut copies of the model (seconds per strategy) "
                        "instead of estimating from FLOPs at the measured matmul rate")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    c = data_sub.add_parser("check", help="audit a dataset as training will read it")
    c.add_argument("target", help="a training config (.yaml) or a data file (with --model)")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--model", help="the model whose tokenizer is used (with a data file)")
    c.add_argument("--eval", help="an eval file to check for leakage")
    c.add_argument("--output", help="write every finding here (JSON)")
    c.add_argument("--fix", help="write a cleaned copy here (dedup, drop conflicts and leaks)")
    c.add_argument("--threshold", type=float, default=0.8, help="near-duplicate MinHash Jaccard threshold")
    c.add_argument("--preview", type=int, default=3)
    c.add_argument("--format", default="auto")
    c.add_argument("--column", action="append")
    c.add_argument("--max-length", type=int, default=512)
    c.set_defaults(func=cmd_data_check)

    p = sub.add_parser("doctor", help="diagnose a finished or failed run (exit code 1 when a finding is an error)",
                       description="Name what went wrong in a run, with the evidence and the fix. Exit code: 1 when "
                                   "a finding has level error (the run's result cannot be used: divergence, NaN, a "
                                   "model that never emits EOS), 0 otherwise (warnings only, or healthy), 2 for bad "
                                   "input (not a run directory).")
    p.add_argument("run_dir")
    p.add_argument("--output", help="write the diagnosis here (JSON)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("export", help="export a run's final model (--merge folds LoRA into the weights)")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--merge", action="store_true", help="merge LoRA/DoRA adapters into a standalone checkpoint")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="the built-in demo: adapt a small model to support tickets, offline")
    p.add_argument("--out", default="runs/demo", help="where the demo writes its runs")
    p.add_argument("--steps", type=int, help="optimizer steps per trained strategy (default 100; 10 with --quick)")
    p.add_argument("--quick", action="store_true", help="a one-minute version (fewer steps and strategies)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert", help="convert a foreign checkpoint to a Hugging Face folder")
    conv = p.add_subparsers(dest="source", required=True)
    c = conv.add_parser("llama2c", help="a llama2.c checkpoint (.bin) and tokenizer (.bin)")
    c.add_argument("model")
    c.add_argument("tokenizer")
    c.add_argument("out_dir")
    c.set_defaults(func=cmd_convert_llama2c)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # overrides may come after flags (`train c.yaml --resume train.max_steps=9`)
    stray = [a for a in unknown if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if unknown:
        args.overrides = [*args.overrides, *unknown]
    if getattr(args, "no_cache", False):
        args.overrides = [*args.overrides, "data.cache=false"]
    _setup_logging()
    try:
        from tunelab.outputs import OUTPUT_FLAGS, prepare_output_file

        for dest in OUTPUT_FLAGS:  # before the work: a path that cannot be written would lose its results
            if getattr(args, dest, None):
                prepare_output_file(getattr(args, dest), "--" + dest)
        return args.func(args)
    except (TunelabError, RunFault) as exc:
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        print(f"tunelab: error{f' (rank {rank})' if rank else ''}: {exc}", file=sys.stderr)
        # a fault part-way through a run (NaN loss, full disk) is not bad input: exit 1, not 2
        return 1 if isinstance(exc, RunFault) else 2
    except KeyboardInterrupt as exc:
        print(f"tunelab: {exc or 'interrupted'}", file=sys.stderr)
        return 130
