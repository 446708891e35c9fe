"""`tunelab serve` throughput: aggregate tokens/s and time to first token at 1, 8 and 32 concurrent streamed clients,
against the same requests answered one after another by a plain `model.generate` loop on the same model.

Greedy, a fixed max_tokens, prompts of varied length (each a user turn of the model's chat template). The model is
SmolLM2-135M-Instruct from ../shared/data, converted from its GGUF file with transformers' GGUF loader into a
Hugging Face folder once.

    python bench/serve.py                                  # the real benchmark (a quiet machine: CPU)
    python bench/serve.py --model DIR --clients 2 --max-tokens 4 --smoke   # a smoke run, no timing claims
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GGUF = ROOT.parent / "shared" / "data" / "smollm2_135m_instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TOPICS = ["the sea", "a small robot", "bread", "the moon", "winter", "a library", "trains", "gardens"]


def prompts(n: int) -> list[str]:
    return [f"Write a few sentences about {TOPICS[i % len(TOPICS)]}." + " Be vivid." * (i % 4) for i in range(n)]


def gguf_folder(gguf: Path, out: Path) -> Path:
    """The GGUF checkpoint as a Hugging Face folder, as `tunelab convert gguf` writes it (float32), once."""
    from tunelab.models.gguf import convert_gguf

    return out if (out / "config.json").is_file() else convert_gguf(gguf, out)


def sequential_baseline(pool, texts: list[str], max_tokens: int) -> dict:
    """Each request alone through a plain model.generate loop (the prompt rendered as the server renders it)."""
    import torch

    from tunelab.serve.prompts import completion_text
    from tunelab.evaluate.generate import encode_prompts

    served = pool.get(pool.names[0])
    model, tok = served.em.model.base, served.em.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tokens, start = 0, time.perf_counter()
    for text in texts:
        ids = torch.tensor([encode_prompts(tok, [completion_text(served, text)])[0]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                                 min_new_tokens=max_tokens, pad_token_id=pad)
        tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


async def _clients(url: str, model: str, texts: list[str], max_tokens: int) -> list[tuple[float, int]]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)

    async def one(text: str) -> tuple[float, int]:
        t0, first, usage = time.perf_counter(), None, 0
        stream = await client.completions.create(model=model, prompt=text, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - t0
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return (first if first is not None else time.perf_counter() - t0), usage

    try:
        return await asyncio.gather(*(one(t) for t in texts))
    finally:
        await client.close()


def served_run(url: str, model: str, texts: list[str], max_tokens: int) -> dict:
    start = time.perf_counter()
    results = asyncio.run(_clients(url, model, texts, max_tokens))
    wall = time.perf_counter() - start
    tokens = sum(n for _, n in results)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_median_s": statistics.median(t for t, _ in results), "ttft_max_s": max(t for t, _ in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder (default: SmolLM2-135M-Instruct converted from its GGUF)")
    parser.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="check it runs; the figures mean nothing")
    parser.add_argument("--output", help="write the rows here (JSON)")
    args = parser.parse_args()

    from tunelab.serve.pool import load_pool
    from tunelab.serve.server import running

    model = args.model or str(gguf_folder(GGUF, Path(tempfile.gettempdir()) / "tunelab-bench-smollm2-135m"))
    pool = load_pool(model, [], name="model")
    rows = []
    with running(pool, max_batch=32, max_waiting=256) as srv:
        served_run(srv.url, "model", prompts(1), 2)  # warm-up
        for n in [int(c) for c in args.clients.split(",")]:
            texts = prompts(n)
            # the server answers max_tokens unless the model ends first: the baseline generates as many tokens
            server = served_run(srv.url, "model", texts, args.max_tokens)
            base = sequential_baseline(pool, texts, args.max_tokens)
            rows.append({"clients": n, "max_tokens": args.max_tokens, "server": server, "sequential_generate": base,
                         "speedup": server["tokens_per_s"] / base["tokens_per_s"]})
            print(json.dumps(rows[-1]))
    if args.output:
        Path(args.output).write_text(json.dumps({"smoke": args.smoke, "model": model, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
