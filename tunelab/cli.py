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


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from tunelab.config import load_config
    from tunelab.train.loop import train

    if args.nproc and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        from tunelab.train.distributed import launch_torchrun

        from tunelab.train.session import check_processes

        # refuse a bad config, or one these processes cannot run, before starting any
        check_processes(load_config(args.config, args.overrides), args.nproc)
        flags = (["--resume"] if args.resume else []) + (["--overwrite"] if args.overwrite else [])
        launch_torchrun(["train", args.config, *args.overrides, *flags], args.nproc)
        return 0
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
    from tunelab.runfiles import RunFiles

    print(f"{summary}\nmodel: {result.final_dir}\nmetrics: {RunFiles(result.run_dir).metrics}\n"
          f"report: {report_run(result.run_dir)}")
    return 0


def cmd_convert_llama2c(args: argparse.Namespace) -> int:
    from tunelab.models.llama2c import convert_llama2c

    out = convert_llama2c(Path(args.model), Path(args.tokenizer), Path(args.out_dir))
    print(f"wrote a Hugging Face Llama folder to {out}")
    return 0


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    from tunelab.models.gguf import convert_gguf

    out = convert_gguf(Path(args.file), Path(args.out_dir), args.dtype)
    print(f"wrote a Hugging Face folder to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from tunelab.config import TrainConfig
    from tunelab.demo import run_demo
    from tunelab.train.session import set_denormal_mode

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

    from tunelab.runfiles import is_run_dir

    flags = {key: getattr(args, key, None) for key in ("device", "precision")}
    if is_run_dir(path) or not (getattr(args, "config", None) or "").endswith((".yaml", ".yml")):
        return flags
    cfg = load_config(args.config)
    return {key: value or getattr(cfg.eval, key) for key, value in flags.items()}


def _eval_data(args: argparse.Namespace, em: Any, settings: Any) -> Any:
    """The eval data as the run rendered its own (a run directory), as --config says, or as the flags say."""
    from tunelab.config import load_config
    from tunelab.evaluate.run import PlainReading, load_eval_file

    cfg = em.run_config or (load_config(args.config) if args.config else None)
    plain = PlainReading(args.format, dict(c.split("=", 1) for c in args.column or []), args.max_length, args.template,
                         args.target_template, args.num_shots, args.train_file)
    return load_eval_file(args.data, settings, cfg, plain)


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


def cmd_serve(args: argparse.Namespace) -> int:
    from tunelab.errors import ConfigError
    from tunelab.serve.pool import load_pool
    from tunelab.serve.server import serve_forever

    adapters = [tuple(item.split("=", 1)) for item in args.adapter or []]
    if any(len(a) != 2 or not a[0] or not a[1] for a in adapters):
        raise ConfigError("--adapter takes NAME=RUN_DIR (e.g. --adapter support=runs/lora).")
    pool = load_pool(args.model, adapters, args.name, args.device, args.precision)  # type: ignore[arg-type]
    log.info(f"serving {', '.join(pool.names)} on http://{args.host}:{args.port} (chat page at /)")
    serve_forever(pool, args.host, args.port, args.max_batch, args.max_waiting)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from tunelab.evaluate.diff import diff
    from tunelab.evaluate.loaders import load_for_eval
    from tunelab.report.run_report import report_run
    from tunelab.runfiles import RunFiles, write_json

    tuned = load_for_eval(args.tuned, **_device_flags(args, args.tuned))
    # the base where the tuned model runs, in its precision: the same arithmetic on both sides of every figure
    base = load_for_eval(args.base, device=tuned.device_setting, precision=tuned.precision_setting)
    eval_settings, diff_settings = _settings(args, tuned.run_config)
    data = _eval_data(args, tuned, eval_settings) if args.data else None
    result = diff(base, tuned, data, diff_settings, eval_settings)
    out = write_json(Path(args.output) if args.output else RunFiles(args.tuned).diff, result)
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
    from tunelab.report.run_report import compare_summary, report_run
    from tunelab.runfiles import compare_dir
    from tunelab.train.session import resolve_device, set_denormal_mode

    cfg = load_config(args.config, args.overrides)
    # before the base model's evaluation runs anything: every intra-op thread copies the flag when it starts
    set_denormal_mode(cfg.train, resolve_device(cfg.train)[0])
    out = Path(args.out) if args.out else compare_dir(cfg.output_dir)
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
    print(compare_summary(result))
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
    from tunelab.data.audit import audit, check_fix_target, source_configs, terminal_summary, write_fixed_copy
    from tunelab.data.render import RenderSpec, spec_from_config
    from tunelab.errors import ConfigError
    from tunelab.models.load import load_tokenizer
    from tunelab.report.data_report import write_data_report

    cfg = None
    if args.target.endswith((".yaml", ".yml")):
        cfg = load_config(args.target, args.overrides)
        spec, model_cfg, eval_path = spec_from_config(cfg), cfg.model, args.eval or cfg.data.eval
        files = source_configs(cfg.data)
        report_dir = Path(cfg.output_dir)
    else:
        if not args.model:
            raise ConfigError("checking a data file needs --model (its tokenizer decides lengths and the label mask), "
                              "or pass a training config instead.")
        columns = dict(c.split("=", 1) for c in args.column or [])
        files = [(args.target, DataConfig(train=args.target, format=args.format, columns=columns,
                                          max_length=args.max_length))]
        spec, model_cfg, eval_path, report_dir = RenderSpec(), ModelConfig(path=args.model), args.eval, Path(".")
    if args.fix:
        check_fix_target(args.fix, [path for path, _ in files])
    tokenizer = load_tokenizer(model_cfg)
    results = [audit(path, data_cfg, spec, tokenizer, eval_path, args.threshold, args.preview)
               for path, data_cfg in files]
    report_root = Path(args.output).parent if args.output else report_dir
    for i, ((path, _), result) in enumerate(zip(files, results)):
        print(terminal_summary(result, path))
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
        (path, data_cfg), out_file = files[0], Path(args.fix)
        kept, dropped = write_fixed_copy(results[0], path, data_cfg.column_names, out_file)
        print(f"--fix: wrote {kept} records to {out_file} ({dropped} dropped)")
    blocking = sorted({k for r in results for k in r["blocking"]})
    if blocking:
        print(f"blocking: {', '.join(blocking)}")
        return 1
    return 0


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


def cmd_plan(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.plan.run import plan, write_plan
    from tunelab.plan.table import plan_text
    from tunelab.runfiles import compare_of

    cfg = load_config(args.config, args.overrides)
    timer = None
    if args.measure:  # plan/ runs no model itself: the training side's step timer is handed to it
        from tunelab.train.timing import measured_step_seconds as timer
    for gpu in args.gpu or ["cpu"]:
        result = plan(cfg, gpu, args.pretraining_tokens, compare_json=compare_of(cfg.output_dir), step_timer=timer)
        print(plan_text(result))
        if args.output:
            out = Path(args.output)
            write_plan(result, str(out if len(args.gpu or []) < 2 else out.with_name(f"{out.stem}-{gpu}{out.suffix}")))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tunelab.export.command import export_command

    print(export_command(Path(args.run_dir), Path(args.out_dir), args.format, args.quant, args.overwrite, args.merge,
                         args.parity, args.parity_tokens))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description="Fine-tune a causal LM on labeled examples.")
    sub = parser.add_subparsers(dest="command", required=True)

    for add_commands in (_training_commands, _model_commands, _tool_commands):
        add_commands(sub)
    return parser


def _training_commands(sub: Any) -> None:
    """train, compare and plan: the commands that read a training config."""
    p = sub.add_parser("train", help="fine-tune a model as a YAML config says")
    p.add_argument("config", help="the YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=50")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete the run in output_dir and start again")
    p.add_argument("--nproc", type=int, help="data-parallel processes (runs torchrun --nproc_per_node N)")
    _add_cache_flag(p)
    p.set_defaults(func=cmd_train)

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


def _model_commands(sub: Any) -> None:
    """eval, chat, generate, serve, diff and report: the commands that use a tuned model or a run."""
    from tunelab.runfiles import DIFF

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

    p = sub.add_parser("serve", help="an OpenAI-compatible API and chat page over a run or model and its adapters")
    p.add_argument("model", help="a tunelab run directory or a model folder (the base the adapters share)")
    p.add_argument("--adapter", action="append", help="NAME=RUN_DIR: a LoRA/DoRA/IA3 or soft-prompt run over the same "
                   "base, served as model NAME (repeatable)")
    p.add_argument("--name", help="the API name of MODEL (default: its folder name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="requests generated together at most")
    p.add_argument("--max-waiting", type=int, default=64, help="requests waiting at most (then 503, Retry-After)")
    _add_device_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("diff", help="the tuned model against its base: task gain, forgetting, drift")
    p.add_argument("base")
    p.add_argument("tuned")
    p.add_argument("--data", help="eval data for the task metric")
    _add_eval_flags(p, data_positional=False)
    p.add_argument("--reference-text", help="general text for perplexity and KL (default: samples of the base)")
    p.add_argument("--probes", help="JSONL of {prompt, answer} general-knowledge probes")
    p.add_argument("--output", help=f"where {DIFF} goes (default: TUNED/{DIFF})")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("report", help="write report.html and report.md for a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)


def _tool_commands(sub: Any) -> None:
    """data check, doctor, export, demo and convert."""
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
    p.add_argument("--format", default="hf", help="hf (default), gguf (llama.cpp, LM Studio), ollama (GGUF and a "
                   "Modelfile) or vllm (an adapter checked for vLLM's LoRA)")
    p.add_argument("--quant", default="f16", help="GGUF type: f32, f16 (default), bf16, q8_0 or q4_k_m")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (gguf, ollama, vllm)")
    p.add_argument("--parity", metavar="FILE", help="held-out records: compare the GGUF in llama.cpp with the tuned "
                   "model on them (prompt ids, greedy tokens)")
    p.add_argument("--parity-tokens", type=int, default=32, help="new tokens per parity prompt (default 32)")
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
    c = conv.add_parser("gguf", help="a GGUF file (llama.cpp, Ollama), weights dequantized by transformers' loader")
    c.add_argument("file")
    c.add_argument("out_dir", help="a new folder (an existing one is refused)")
    c.add_argument("--dtype", choices=["float32", "bf16"], default="float32",
                   help="float32 keeps the dequantized weights exactly; bf16 halves the folder (default float32)")
    c.set_defaults(func=cmd_convert_gguf)


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
