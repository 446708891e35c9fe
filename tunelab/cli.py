"""The `tunelab` command: parse arguments, load the config, call the parts. No logic of its own."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tunelab.errors import TunelabError

log = logging.getLogger("tunelab")


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tunelab: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    for noisy in ("transformers", "torch", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def cmd_train(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.train.loop import train

    extra = {}
    if args.resume:
        extra["resume"] = True
    if args.overwrite:
        extra["overwrite"] = True
    cfg = load_config(args.config, args.overrides, extra)
    result = train(cfg)
    summary = f"final train loss {result.final_loss:.4f}"
    if result.eval:
        summary += f", eval loss {result.eval['eval_loss']:.4f}"
    print(f"{summary}\nmodel: {result.final_dir}\nmetrics: {result.run_dir / 'metrics.jsonl'}")
    return 0


def cmd_convert_llama2c(args: argparse.Namespace) -> int:
    from tunelab.models.llama2c import convert_llama2c

    out = convert_llama2c(Path(args.model), Path(args.tokenizer), Path(args.out_dir))
    print(f"wrote a Hugging Face Llama folder to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tunelab.demo import run_demo

    run_demo(Path(args.out), steps=args.steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description="Fine-tune a causal LM on labeled examples.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a model as a YAML config says")
    p.add_argument("config", help="the YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=50")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete the run in output_dir and start again")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="the built-in demo: fine-tune a real tiny model offline")
    p.add_argument("--out", default="runs/demo", help="where the demo writes its runs")
    p.add_argument("--steps", type=int, default=300)
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
    _setup_logging()
    try:
        return args.func(args)
    except TunelabError as exc:
        print(f"tunelab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"tunelab: {exc or 'interrupted'}", file=sys.stderr)
        return 130
