"""`tunelab diff`: the tuned model against its base, on the same inputs: what the tuning bought on the
task and what it changed elsewhere (forgetting, probe answers, output length, EOS, format collapse).
Every figure comes with a verdict (tunelab/evaluate/verdicts.py): its value, the threshold that judged it, a
level and a plain-language sentence."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from tunelab.data.encode import IGNORE, EncodeStats, encode_examples
from tunelab.data.read import read_records
from tunelab.data.records import Example
from tunelab.data.render import RenderSpec, render_example
from tunelab.config import DiffConfig, EvalConfig
from tunelab.errors import DataError
from tunelab.evaluate.generate import generate
from tunelab.evaluate.loaders import EvalModel, adaptation_off
from tunelab.evaluate.metrics import normalize
from tunelab.evaluate.run import EvalData, evaluate, label_options
from tunelab.evaluate.score import label_log_probs, sequence_log_probs
from tunelab.evaluate.verdicts import PPL_MILD, PPL_STRONG, graded, judged
from tunelab.models.device import to_device
from tunelab.models.load import pad_token_id
from tunelab.percentile import percentile
from tunelab.data.batching import pad_collate

# thresholds of the verdicts (stated in every verdict)
KL_SMALL, KL_LARGE = 0.05, 0.5  # nats per token
LENGTH_RATIO = 2.0  # mean output length changed by more than this factor
EOS_DROP = 0.5  # EOS share fell below half of the base's
COLLAPSE = 0.2  # share of outputs on unrelated prompts that look like task outputs


def reference_texts(base: EvalModel, settings: DiffConfig) -> tuple[list[str], str]:
    """General text to measure forgetting on, and where it came from."""
    if settings.reference_text:
        path = Path(settings.reference_text)
        if not path.is_file():
            raise DataError(f"reference text file '{path}' does not exist.")
        parts = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        if not parts:
            raise DataError(f"reference text file '{path}' is empty.")
        return parts, str(path)
    tok = base.tokenizer
    start = "" if tok.bos_token_id is not None else tok.eos_token
    gens = generate(base, [start] * settings.num_samples, settings.sample_tokens, do_sample=True,
                    batch_size=settings.num_samples, seed=settings.seed)
    return [g.text for g in gens if g.text.strip()], f"{settings.num_samples} samples of the base model (temperature 1)"


def _encode_texts(em: EvalModel, texts: list[str], max_length: int) -> list[Any]:
    """The reference texts, each token after the first scored. The first is never scored: nothing of the text
    precedes it for the base, while a soft prompt's virtual tokens would predict it, and base and tuned model must
    score the same tokens (their KL is taken position by position)."""
    examples = [Example("text", {"text": t}, f"reference:{i + 1}", i) for i, t in enumerate(texts)]
    rendered = [render_example(e, RenderSpec(mode="template"), em.tokenizer) for e in examples]
    encoded = encode_examples(rendered, em.tokenizer, max_length, "right", EncodeStats())
    return [replace(e, labels=[IGNORE, *e.labels[1:]]) for e in encoded]


def perplexity(em: EvalModel, texts: list[str], max_length: int = 512) -> float:
    scored = sequence_log_probs(em.model, _encode_texts(em, texts, max_length), pad_token_id(em.tokenizer))
    return math.exp(-sum(s for s, _ in scored) / max(1, sum(n for _, n in scored)))


def _memo(cache: dict[str, Any] | None, key: str, fn: Callable[[], Any]) -> Any:
    """fn(), computed once per `cache` (figures of the base model that several diffs share)."""
    if cache is None:
        return fn()
    if key not in cache:
        cache[key] = fn()
    return cache[key]


@torch.no_grad()
def mean_kl(base: EvalModel, tuned: EvalModel, texts: list[str], max_length: int = 512, batch_size: int = 8,
            cache: dict[str, Any] | None = None) -> float:
    """Mean per-token KL(base || tuned) of the next-token distributions along the reference text."""
    encoded = sorted(_encode_texts(base, texts, max_length), key=lambda e: len(e.input_ids))  # batches pad little
    pad = pad_token_id(base.tokenizer)
    total, count = 0.0, 0
    dev_b, dev_t = next(base.model.parameters()).device, next(tuned.model.parameters()).device
    for s in range(0, len(encoded), batch_size):
        part = encoded[s : s + batch_size]
        bb = to_device(pad_collate(part, pad, base.model.virtual_tokens), dev_b)
        tb = to_device(pad_collate(part, pad, tuned.model.virtual_tokens), dev_t)
        base_lps = _memo(cache, f"kl:{max_length}:{batch_size}:{s}", lambda: [lp for lp, _, _ in label_log_probs(base.model, bb)])
        for lp_b, (lp_t, _, _) in zip(base_lps, label_log_probs(tuned.model, tb)):
            lp_t = lp_t.to(lp_b.device)
            total += float((lp_b.exp() * (lp_b - lp_t)).sum())
            count += lp_b.shape[0]
    return total / max(1, count)


def read_probes(path: str) -> list[dict[str, str]]:
    probes = []
    for rec in read_records(path):
        prompt = rec.fields.get("prompt", rec.fields.get("question"))
        answer = rec.fields.get("answer", rec.fields.get("completion"))
        if prompt is None or answer is None:
            raise DataError(f"{rec.source}: a probe needs 'prompt' (or 'question') and 'answer' fields.")
        probes.append({"prompt": str(prompt), "answer": str(answer)})
    return probes


def _lengths(gens: list[Any]) -> dict[str, float]:
    n = sorted(g.num_tokens for g in gens)
    return {"mean": statistics.fmean(n), "median": statistics.median(n), "p90": percentile(n, 0.9)}


def _task_like(text: str, labels: set[str], template_prefix: str) -> bool:
    stripped = text.strip()
    return normalize(stripped) in labels or (bool(template_prefix) and stripped.startswith(template_prefix))


def _perplexity_verdict(ratio: float, figure: str) -> dict[str, Any]:
    """The forgetting verdict of a tuned / base perplexity ratio on general text."""
    return graded(ratio, (PPL_MILD, PPL_STRONG), ("no measurable forgetting", "mild forgetting", "strong forgetting"),
                  figure, "x{}")


def _right(probes: list[dict[str, str]], gens: list[Any]) -> list[bool]:
    """Whether each probe's normalised answer appears in its normalised generation."""
    return [normalize(p["answer"]) in normalize(g.text) for p, g in zip(probes, gens)]


def _forgetting_off(base: EvalModel, off: EvalModel, texts: list[str], ppl_b: float, probes: list[dict[str, str]],
                    settings: DiffConfig, base_cache: dict[str, Any] | None) -> dict[str, Any]:
    """The forgetting figures of the tuned model with its adaptation taken off (measured, not assumed: they are
    the base's exactly when the adaptation really comes off)."""
    ppl_off = perplexity(off, texts)
    figures: dict[str, Any] = {"perplexity_tuned": ppl_off, "perplexity_ratio": ppl_off / ppl_b,
                               "kl_base_to_tuned": mean_kl(base, off, texts, cache=base_cache)}
    if probes:
        figures["probes_right"] = sum(_right(probes, generate(off, [p["prompt"] for p in probes],
                                                              settings.max_new_tokens)))
    figures["verdict"] = _perplexity_verdict(figures["perplexity_ratio"],
                                             "general-text perplexity with the adaptation off")
    return figures


def _task_gain(base: EvalModel, tuned: EvalModel, data: EvalData, eval_settings: EvalConfig,
               base_eval: dict[str, Any] | None) -> dict[str, Any]:
    """The task metric before and after, and its verdict."""
    sb = base_eval or evaluate(base, data, eval_settings)[0]
    st = evaluate(tuned, data, eval_settings)[0]
    metric = next(iter(st["metrics"]))
    gain = st["metrics"][metric] - sb["metrics"][metric]
    return {"metric": metric, "base": sb["metrics"], "tuned": st["metrics"], "gain": gain, "mode": st["mode"],
            "num_examples": st["num_examples"],
            "verdict": judged(f"task {metric}", gain, "any gain > 0", gain <= 0,
                              f"{'better' if gain > 0 else 'not better'} on the task: {metric} "
                              f"{sb['metrics'][metric]:.3f} -> {st['metrics'][metric]:.3f} (threshold: any gain > 0)")}


def diff(base: EvalModel, tuned: EvalModel, data: EvalData | None, settings: DiffConfig,
         eval_settings: EvalConfig, reference: tuple[list[str], str] | None = None,
         base_eval: dict[str, Any] | None = None, base_cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every figure of the diff, each with its verdict. `reference`, `base_eval` and `base_cache` (a dict
    this fills) reuse figures of the base model that a comparison of several tuned models shares."""
    out: dict[str, Any] = {"base": base.name, "tuned": tuned.name,  # and the resolved settings it ran with
                           "settings": {"eval": eval_settings.model_dump(mode="json"),
                                        "diff": settings.model_dump(mode="json")}}
    labels: set[str] = set()
    template_prefix = ""
    if data is not None:
        out["task"] = _task_gain(base, tuned, data, eval_settings, base_eval)
        if out["task"]["mode"] == "score":
            labels = {normalize(o) for o in label_options(data)}
        if data.spec.template is not None:
            template_prefix = data.spec.template.target.split("{")[0].strip()

    texts, source = reference or reference_texts(base, settings)
    ppl_b = _memo(base_cache, "perplexity", lambda: perplexity(base, texts))
    ppl_t = perplexity(tuned, texts)
    kl = mean_kl(base, tuned, texts, cache=base_cache)
    out["forgetting"] = {
        "reference": source, "num_texts": len(texts), "perplexity_base": ppl_b, "perplexity_tuned": ppl_t,
        "perplexity_ratio": ppl_t / ppl_b, "kl_base_to_tuned": kl,
        "perplexity_verdict": _perplexity_verdict(ppl_t / ppl_b, "general-text perplexity"),
        "kl_verdict": graded(kl, (KL_SMALL, KL_LARGE), ("close to the base", "moderate shift", "large shift"),
                               "KL(base||tuned)", "{} nats per token"),
    }

    probes = read_probes(settings.probes) if settings.probes else []
    out["forgetting"]["ranked_by"] = "adaptation on"
    if tuned.detachable:  # the way such a strategy keeps general knowledge: the base, with the adaptation off
        with adaptation_off(tuned) as off:  # ended where the base's answers end, to be the base in every respect
            out["forgetting"]["adaptation_off"] = _forgetting_off(base, replace(off, stop_texts=base.stop_texts),
                                                                  texts, ppl_b, probes, settings, base_cache)
        out["forgetting"]["ranked_by"] = "adaptation off"

    if settings.probes:
        prompts = [p["prompt"] for p in probes]
        before = _memo(base_cache, "probe generations", lambda: generate(base, prompts, settings.max_new_tokens))
        after = generate(tuned, prompts, settings.max_new_tokens)
        right_b = _right(probes, before)
        right_t = _right(probes, after)
        lost = [p["prompt"] for p, b, t in zip(probes, right_b, right_t) if b and not t]
        gained = [p["prompt"] for p, b, t in zip(probes, right_b, right_t) if t and not b]
        out["probes"] = {"num": len(probes), "right_base": sum(right_b), "right_tuned": sum(right_t), "lost": lost,
                         "gained": gained, "rule": "right when the normalised answer appears in the normalised output",
                         "verdict": judged("probe answers lost", len(lost), "any lost answer is forgetting", bool(lost),
                                           f"{'forgot' if lost else 'kept'} probe answers: {sum(right_b)} -> "
                                           f"{sum(right_t)} of {len(probes)} right, {len(lost)} lost, {len(gained)} "
                                           "gained (threshold: any lost answer is forgetting)")}
        gens_b, gens_t = before, after  # drift is read on the same generations
    else:
        prompts = [base.tokenizer.decode(base.tokenizer(t, add_special_tokens=False)["input_ids"][:8]) for t in texts]
        gens_b = _memo(base_cache, "drift generations", lambda: generate(base, prompts, settings.max_new_tokens))
        gens_t = generate(tuned, prompts, settings.max_new_tokens)
    len_b, len_t = _lengths(gens_b), _lengths(gens_t)
    eos_b = sum(g.ended_with_eos for g in gens_b) / len(gens_b)
    eos_t = sum(g.ended_with_eos for g in gens_t) / len(gens_t)
    collapse_b = sum(_task_like(g.text, labels, template_prefix) for g in gens_b) / len(gens_b)
    collapse_t = sum(_task_like(g.text, labels, template_prefix) for g in gens_t) / len(gens_t)
    ratio = (len_t["mean"] + 1) / (len_b["mean"] + 1)
    drifted = not 1 / LENGTH_RATIO <= ratio <= LENGTH_RATIO
    stops_less = eos_t < EOS_DROP * eos_b
    collapsed = collapse_t > COLLAPSE and collapse_t > collapse_b
    out["drift"] = {
        "prompts": "probe prompts" if settings.probes else "the first 8 tokens of each reference text",
        "length_base": len_b, "length_tuned": len_t, "eos_share_base": eos_b, "eos_share_tuned": eos_t,
        "format_collapse_base": collapse_b, "format_collapse_tuned": collapse_t,
        "length_verdict": judged("output length ratio", ratio, LENGTH_RATIO, drifted,
                                 f"output length {'drifted' if drifted else 'kept'}: mean {len_b['mean']:.1f} -> "
                                 f"{len_t['mean']:.1f} tokens (threshold: a factor of {LENGTH_RATIO})", "warning"),
        "eos_verdict": judged("EOS share", eos_t, EOS_DROP * eos_b, stops_less,
                              f"{'stops less often' if stops_less else 'still stops'}: EOS in {100 * eos_b:.0f}% -> "
                              f"{100 * eos_t:.0f}% of outputs (threshold: below {EOS_DROP:.0%} of the base's)",
                              "warning"),
        "collapse_verdict": judged("task-format share of unrelated prompts", collapse_t, COLLAPSE, collapsed,
                                   f"{'collapsed into the task format' if collapsed else 'no format collapse'}: "
                                   f"{100 * collapse_b:.0f}% -> {100 * collapse_t:.0f}% of unrelated prompts answered "
                                   f"in the task's label set or output template (threshold: {COLLAPSE:.0%})"),
        "examples": [{"prompt": p, "base": b.text, "tuned": t.text} for p, b, t in list(zip(prompts, gens_b, gens_t))[:5]],
    }
    return out
