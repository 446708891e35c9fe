"""Task metrics over (prediction, reference) pairs. BLEU and ROUGE come from sacrebleu and rouge-score."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize(text: str) -> str:
    """SQuAD-style: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    return _mean([normalize(p) == normalize(r) for p, r in zip(predictions, references)])


def accuracy(predictions: list[str], references: list[str]) -> float:
    """Exact equality after stripping surrounding whitespace (for labels)."""
    return _mean([p.strip() == r.strip() for p, r in zip(predictions, references)])


def macro_f1(predictions: list[str], references: list[str]) -> float:
    """The mean over reference classes of each class's F1 (a prediction outside the classes is a miss)."""
    preds = [p.strip() for p in predictions]
    refs = [r.strip() for r in references]
    scores = []
    for label in sorted(set(refs)):
        tp = sum(p == label and r == label for p, r in zip(preds, refs))
        fp = sum(p == label and r != label for p, r in zip(preds, refs))
        fn = sum(p != label and r == label for p, r in zip(preds, refs))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return _mean(scores)


def token_f1(predictions: list[str], references: list[str]) -> float:
    """SQuAD token overlap F1 of normalised texts, averaged over examples."""
    scores = []
    for p, r in zip(predictions, references):
        pt, rt = normalize(p).split(), normalize(r).split()
        common = sum((Counter(pt) & Counter(rt)).values())
        if not pt or not rt:
            scores.append(float(pt == rt))
        elif common == 0:
            scores.append(0.0)
        else:
            precision, recall = common / len(pt), common / len(rt)
            scores.append(2 * precision * recall / (precision + recall))
    return _mean(scores)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, with stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)])


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu's defaults), on a 0-100 scale."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def extract_number(text: str) -> str | None:
    """The answer of a GSM8K-style text: the number after '####', else the last number; commas dropped."""
    if "####" in text:
        text = text.split("####")[-1]
        found = _NUMBER.findall(text)
        found = found[:1]
    else:
        found = _NUMBER.findall(text)[-1:]
    if not found:
        return None
    number = found[0].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number


def numeric_match(predictions: list[str], references: list[str]) -> float:
    """GSM8K accuracy: the extracted numbers are equal."""
    return _mean([(n := extract_number(p)) is not None and n == extract_number(r) for p, r in zip(predictions, references)])


def _mean(values: list) -> float:
    return sum(values) / len(values) if values else 0.0


METRICS: dict[str, Callable[[list[str], list[str]], float]] = {
    "exact_match": exact_match, "accuracy": accuracy, "macro_f1": macro_f1, "token_f1": token_f1,
    "rouge_l": rouge_l, "bleu": bleu, "numeric_match": numeric_match,
}


def compute(names: list[str], predictions: list[str], references: list[str]) -> dict[str, float]:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        from tunelab.errors import ConfigError

        raise ConfigError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}.")
    return {n: METRICS[n](predictions, references) for n in names}
