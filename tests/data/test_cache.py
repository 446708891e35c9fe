"""The on-disk encoded-data cache: what makes a new entry and what does not, cached == uncached (batches and
losses), a killed encode, errors through datasets' map, and mixtures."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import config_tree, write_jsonl
from tunelab.cli import main
from tunelab.config import validate_config
from tunelab.data import cache
from tunelab.data.dataset import load_datasets, load_examples, sample, split_eval
from tunelab.data.encode import EncodeStats, encode_examples, encode_pretokenized
from tunelab.data.render import render_example, spec_from_config
from tunelab.errors import ConfigError, DataError
from tunelab.models.load import load_tokenizer
from tunelab.train.batches import make_batch_plan
from tunelab.train.loop import train
from tunelab.runfiles import read_metrics

QA = [{"prompt": f"Question {i}: what is {i} plus {i}?\nAnswer:", "completion": f" {2 * i}"} for i in range(40)]



def encode_in_memory(examples, cfg, tokenizer, pool):
    """The reference: examples held in memory, rendered and encoded one by one with the encoder's own functions
    (no table, no cache); (encoded examples, their statistics)."""
    stats = EncodeStats()
    if examples and examples[0].shape == "tokenized":
        return encode_pretokenized(examples, cfg.data.max_length, cfg.data.truncation, stats), stats
    rendered = [render_example(ex, spec_from_config(cfg), tokenizer, pool) for ex in examples]
    return encode_examples(rendered, tokenizer, cfg.data.max_length, cfg.data.truncation, stats), stats

def _cfg(tmp_path, model, data=None, strategy=None, **data_settings):
    path = data or write_jsonl(tmp_path / "qa.jsonl", QA)
    tree = config_tree(model, path, tmp_path / "run", strategy=strategy or {"name": "full"},
                       data={"cache_dir": str(tmp_path / "cache"), "max_length": 64, **data_settings},
                       train={"max_steps": 2})
    return validate_config(tree)


def _entries(tmp_path) -> set[str]:
    return {p.name for p in (tmp_path / "cache").iterdir() if (p / "meta.json").is_file()}


def _load(cfg, tokenizer=None):
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    return load_datasets(cfg.data, spec_from_config(cfg), tokenizer, cfg.train.seed)


def test_each_key_changed_alone_encodes_again_and_nothing_else_does(tmp_path, stories260k, caplog):
    base = _cfg(tmp_path, stories260k)
    _load(base)
    first = _entries(tmp_path)
    assert len(first) == 1

    def entries_after(cfg, tokenizer=None) -> set[str]:
        with caplog.at_level(logging.INFO, logger="tunelab"):
            caplog.clear()
            _load(cfg, tokenizer)
        return _entries(tmp_path)

    # nothing that leaves the encoding as it is makes a new entry, and the log says the cache served it
    Path(base.data.train_path).touch()  # a new mtime, the same bytes: hashed again, the same key
    same = [base, base.model_copy(update={"train": base.train.model_copy(update={"learning_rate": 0.5, "seed": 7})}),
            base.model_copy(update={"data": base.data.model_copy(update={"max_examples": 10, "eval_fraction": 0.2})})]
    for cfg in same:
        assert entries_after(cfg) == first
        assert "cache hit" in caplog.text

    # each input of the encoding, changed alone, makes one new entry
    def data(**update):
        return base.model_copy(update={"data": base.data.model_copy(update=update)})

    def strategy(**update):
        return base.model_copy(update={"strategy": base.strategy.model_copy(update=update)})

    changed_file = write_jsonl(tmp_path / "qa2.jsonl", QA[:-1] + [{"prompt": "Question: 1?\nAnswer:", "completion": " 1"}])
    template = validate_config({**yaml.safe_load(yaml.safe_dump(base.model_dump(mode="json"))),
                                "strategy": {"name": "full", "template": {"prompt": "Q: {prompt}", "target": "{completion}"}}})
    chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    cases = {
        "file content": data(train=str(changed_file)),
        "max_length": data(max_length=48),
        "truncation": data(truncation="right"),
        "columns": data(columns={"prompt": "prompt", "completion": "completion"}),
        "format": data(format="prompt_completion"),
        "chat template": data(chat_template=chat_template),
        "template": template,
        "shots": strategy(num_shots=1, template=template.strategy.template),
    }
    seen = set(first)
    for what, cfg in cases.items():
        after = entries_after(cfg)
        assert len(after - seen) == 1, what
        assert "cache hit" not in caplog.text, what
        seen = after
    # the tokenizer: the same files with one more special token
    tok = load_tokenizer(base.model)
    tok.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    assert len(entries_after(base, tok) - seen) == 1
    # tunelab's encoding version
    seen = _entries(tmp_path)
    version = cache.ENCODING_VERSION
    try:
        cache.ENCODING_VERSION = version + 1
        assert len(entries_after(base) - seen) == 1
    finally:
        cache.ENCODING_VERSION = version


def test_cached_and_uncached_give_the_in_memory_encoding_and_the_same_batches(tmp_path, stories260k):
    cfg = _cfg(tmp_path, stories260k, eval_fraction=0.25, max_examples=30)
    tokenizer = load_tokenizer(cfg.model)
    cached, cached_eval = _load(cfg, tokenizer)
    _load(cfg, tokenizer)  # from the cache this time
    hit, hit_eval = _load(cfg, tokenizer)
    uncached, uncached_eval = _load(cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache": False})}),
                                    tokenizer)
    # the reference: the records in memory, sampled and split as before, encoded with the in-memory encoder
    examples = sample(load_examples(cfg.data.train_path, cfg.data), 30, cfg.train.seed)
    train_ex, eval_ex = split_eval(examples, 0.25, cfg.train.seed)
    reference, reference_stats = encode_in_memory(train_ex, cfg, tokenizer, pool=train_ex)
    reference_eval, reference_eval_stats = encode_in_memory(eval_ex, cfg, tokenizer, pool=train_ex)
    for split, evals in ((cached, cached_eval), (hit, hit_eval), (uncached, uncached_eval)):
        assert list(split.encoded) == reference and list(evals.encoded) == reference_eval
        assert split.stats == reference_stats and evals.stats == reference_eval_stats
    packed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"tokens_per_step": 256})})
    for config in (cfg, packed):
        plans = [make_batch_plan(config, split.encoded, 0) for split in (cached, uncached)]
        plans.append(make_batch_plan(config, reference, 0))
        for _ in range(3):
            steps = [plan.next_step() for plan in plans]
            for other in steps[1:]:
                for (batch, n), (ref, n_ref) in zip(other, steps[0]):
                    assert n == n_ref and all(bool((batch[k] == ref[k]).all()) for k in ref)


def test_cached_and_uncached_runs_have_the_same_losses(tmp_path, stories260k):
    losses = []
    for name, use_cache in (("cached", True), ("uncached", False)):
        cfg = _cfg(tmp_path, stories260k, cache=use_cache)
        cfg = cfg.model_copy(update={"output_dir": str(tmp_path / name)})
        train(cfg)
        losses.append([r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if r["type"] == "train"])
    assert losses[0] == losses[1] and len(losses[0]) == 2
    assert not (tmp_path / "cache").exists() or len(_entries(tmp_path)) == 1  # the uncached run wrote nothing


def test_a_killed_encode_leaves_nothing_a_later_run_trusts(tmp_path, stories260k):
    rows = [{"prompt": f"Story {i}: once upon a time there was a little cat named Tom {i}.\nEnd:",
             "completion": f" the end of story {i} and the cat slept"} for i in range(60_000)]
    data = write_jsonl(tmp_path / "big.jsonl", rows)
    cfg = _cfg(tmp_path, stories260k, data=data)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    cache_dir = tmp_path / "cache"
    while time.time() < deadline:  # kill it once it is writing its encoded rows
        if any(cache_dir.glob(".tmp-*/encoded*.arrow")) or any(cache_dir.glob(".tmp-*/tmp*")):
            break
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    abandoned = list(cache_dir.glob(".tmp-*"))
    assert abandoned and not _entries(tmp_path)  # a half entry, under no key
    tokenizer = load_tokenizer(cfg.model)
    split, _ = _load(cfg, tokenizer)  # encodes again, and removes what the killed writer left
    assert len(split.encoded) == len(rows) and _entries(tmp_path) and not any(p.exists() for p in abandoned)
    first = load_examples(str(data), cfg.data)[:5]
    assert list(split.encoded[:5]) == encode_in_memory(first, cfg, tokenizer, pool=[])[0]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_bad_record_deep_in_the_file_is_named_through_map(tmp_path, stories260k, capsys, num_proc):
    rows = [dict(r) for r in QA * 60]  # 2,400 rows: with num_proc 2, line 2101 is the second worker's
    rows[2100] = {"prompt": "What is it?", "completion": "   "}
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = _cfg(tmp_path, stories260k, data=data, num_proc=num_proc)
    with pytest.raises(DataError, match=r"bad.jsonl:2101: the target field 'completion' is empty"):
        _load(cfg)
    assert not _entries(tmp_path) if (tmp_path / "cache").exists() else True
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2101" in err and "Traceback" not in err


def test_a_mixture_draws_by_weight_and_says_each_share(tmp_path, stories260k, caplog):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"A{i}:", "completion": f" a{i}"} for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"question": f"B{i}?", "answer": f" b{i}"} for i in range(10)])
    cfg = _cfg(tmp_path, stories260k)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": [
        {"path": str(a), "weight": 1.0}, {"path": str(b), "weight": 3.0,
                                           "columns": {"prompt": "question", "completion": "answer"}}]})})
    cfg = validate_config(cfg.model_dump(mode="json"))
    with caplog.at_level(logging.INFO, logger="tunelab"):
        split, _ = _load(cfg)
    # one epoch holds as many examples as the files do (40): a quarter from a, three quarters from b (upsampled)
    assert split.shares == {str(a): 10, str(b): 30}
    sources = [e.source.split(":")[0] for e in split.encoded]
    assert sources.count(str(a)) == 10 and sources.count(str(b)) == 30
    assert len({e.source for e in split.encoded if e.source.startswith(str(b))}) == 10  # every b row, thrice
    assert f"{a} gives 10 examples (25.0%)" in caplog.text and f"{b} gives 30 examples (75.0%)" in caplog.text
    again, _ = _load(cfg)  # the same draw from the same seed
    assert list(again.encoded) == list(split.encoded)
    # files of different shapes are refused, naming both
    c = write_jsonl(tmp_path / "c.jsonl", [{"text": "x", "label": "y"}] * 3)
    bad = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": [
        cfg.data.train[0], cfg.data.train[0].model_copy(update={"path": str(c)})]})})
    with pytest.raises(DataError, match="c.jsonl"):
        _load(bad)
    # a held-out fraction of a mixture, or demonstrations drawn from one: refused, saying what to do instead
    split_mixture = cfg.model_copy(update={"data": cfg.data.model_copy(update={"eval_fraction": 0.2})})
    with pytest.raises(ConfigError, match="data.eval instead"):
        _load(split_mixture)
