"""GGUF export of a real tuned model: export time and file size for each quant type, llama.cpp's decode speed on
this CPU for each, and the parity figures (tunelab/export/parity.py) against the tuned model.

The model is SmolLM2-135M-Instruct (../shared/data/smollm2_135m_instruct, converted by transformers' GGUF loader),
tuned with LoRA for a few steps on short chats (or pass --run to export a run of your own). For each of f32, f16, bf16,
q8_0 and q4_k_m: `tunelab export --format gguf` timed end to end (merge, llama.cpp's converter, its quantizer), the
file's size, llama.cpp's greedy decode speed (tokens/s over --speed-tokens new tokens after a chat prompt, all
cores), and parity on 20 held-out conversations (prompt ids equal, outputs identical, token agreement, the
near ties of the first differences).

    python bench/export.py                      # the figures of BENCHMARKS.md (a quiet machine: about 15 minutes)
    python bench/export.py --smoke              # a quick check: 2 prompts, f32 and q8_0, 8 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_GGUF = ROOT.parent / "shared" / "data" / "smollm2_135m_instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
TRAIN = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
         for q, a in [("What colour is the sky?", "The sky is blue."), ("Name a fruit.", "An apple is a fruit."),
                      ("What do cats say?", "Cats say meow."), ("Where is Paris?", "Paris is in France.")]]
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is two plus two?",
             "Write a haiku about rain.",
             "Who wrote Hamlet?", "What is the largest planet?", "Give me a synonym for happy.",
             "How many legs does a spider have?", "What is water made of?", "Translate 'thank you' into Spanish.",
             "What day comes after Monday?", "Name a famous painter.", "What is the opposite of hot?",
             "Why do birds fly south?", "What is the boiling point of water?", "Suggest a name for a dog.",
             "What is a triangle?", "How do plants make food?", "Tell me a joke.", "What is the capital of Italy?"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def convert_model(out: Path) -> Path:
    """SmolLM2 as a float32 Hugging Face folder (transformers' GGUF loader, quantization config dropped)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(SHARED_GGUF.parent, gguf_file=SHARED_GGUF.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(SHARED_GGUF.parent, gguf_file=SHARED_GGUF.name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def train_lora(model: Path, work: Path) -> Path:
    from tunelab.config import validate_config
    from tunelab.train.loop import train

    data = write_jsonl(work / "train.jsonl", TRAIN)
    tree = {"model": {"path": str(model)}, "data": {"train": str(data), "max_length": 64},
            "strategy": {"name": "lora", "lora": {"dropout": 0.0}}, "output_dir": str(work / "run"),
            "train": {"max_steps": 4, "batch_size": 2, "learning_rate": 5e-3, "seed": 0, "progress": False}}
    train(validate_config(tree))
    return work / "run"


def decode_speed(gguf: Path, prompt: list[int], tokens: int) -> float:
    """llama.cpp's greedy decode speed (new tokens per second after the prompt), on every core."""
    import numpy as np
    import llama_cpp

    from tunelab.export.parity import _without_weight_repacking

    with _without_weight_repacking():
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(prompt) + tokens + 8, n_threads=os.cpu_count(),
                              verbose=False)
    try:
        llm.eval(prompt)
        start = time.perf_counter()
        for _ in range(tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            llm.eval([int(np.argmax(logits))])
        return tokens / (time.perf_counter() - start)
    finally:
        llm.close()


def bench_quant(run: Path, quant: str, work: Path, em, prompts, conversations, answers, args) -> dict:
    from tunelab.export.gguf import export_gguf
    from tunelab.export.parity import check_parity

    start = time.perf_counter()
    done = export_gguf(run, work / f"export-{quant}", quant)
    seconds = time.perf_counter() - start
    report = check_parity(em, done.gguf, conversations, prompts, max_new_tokens=args.tokens, answers=answers)
    row = {"quant": quant, "export_s": round(seconds, 1), "size_mb": round(done.gguf.stat().st_size / 2**20, 1),
           "decode_tokens_per_s": round(decode_speed(done.gguf, report.rows[0].llama_prompt, args.speed_tokens), 1),
           "prompt_ids_equal": sum(r.prompt_ids_equal for r in report.rows), "prompts": len(report.rows),
           "identical": report.exact, "token_agreement": round(report.token_agreement, 4),
           "same_top": round(report.same_top, 4),
           "first_difference_margins": [round(r.margin_at_difference, 4) for r in report.rows
                                        if r.margin_at_difference is not None],
           "stopped_at_turn_end": sum(r.llama_stopped for r in report.rows)}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a finished tunelab run to export (default: a LoRA run on SmolLM2, made here)")
    parser.add_argument("--quants", default=",".join(QUANTS))
    parser.add_argument("--tokens", type=int, default=32, help="greedy new tokens per parity prompt")
    parser.add_argument("--speed-tokens", type=int, default=128, help="new tokens of the decode-speed measurement")
    parser.add_argument("--smoke", action="store_true", help="2 prompts, f32 and q8_0, 8 tokens")
    parser.add_argument("--output", help="write the rows here (JSON)")
    args = parser.parse_args(argv)
    questions, quants = QUESTIONS, args.quants.split(",")
    if args.smoke:
        questions, quants, args.tokens, args.speed_tokens = QUESTIONS[:2], ["f32", "q8_0"], 8, 8
    from tunelab.evaluate.loaders import load_for_eval
    from tunelab.export.parity import held_out_inputs, tunelab_answers

    with tempfile.TemporaryDirectory(prefix="tunelab-bench-export-") as tmp:
        work = Path(tmp)
        run = Path(args.run) if args.run else train_lora(convert_model(work / "smollm2"), work)
        held_out = write_jsonl(work / "held_out.jsonl", [{"messages": [{"role": "user", "content": q}]}
                                                         for q in questions])
        em = load_for_eval(str(run), device="cpu", precision="fp32")
        prompts, conversations = held_out_inputs(em, str(held_out))
        answers = tunelab_answers(em, prompts, args.tokens)  # tunelab's side, the same for every quant
        rows = [bench_quant(run, quant, work, em, prompts, conversations, answers, args) for quant in quants]
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
