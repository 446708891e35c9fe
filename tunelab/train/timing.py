"""Step time, measured: for `tunelab plan`'s CPU estimate, instead of a model of the CPU.

A CPU's speed on a training step depends on the shapes of its matrix products, its caches and its
element-wise work far more than on its peak FLOP rate: a fixed share of a measured matmul rate was
off by 2x between short and long rows. So the plan asks the training side to time real optimizer
steps of the configured strategy (`tunelab.train.loop.take_step`, the loop's own code, on a session
set up by train/session.py as the recipe sets it up), on the real batches of the user's data, with
copies of the model cut to a few decoder layers (random weights, so the user's weights are never
read: the speed of a step does not depend on their values once denormal floats are flushed to zero,
as training on the CPU does by default; a trained model's denormals slowed its steps by ~10%, which
random weights do not show). Decoder layers are identical, so the step of the whole model is the
step of the cut copy plus the measured cost of one more layer times the missing layers.

It lives in `train/` because it is the step loop, timed. `plan/` never imports it: DESIGN.md says
plan runs no model except under `--measure`, and then through a timer it is given, so `tunelab plan
--measure` passes this function to `plan(..., step_timer=...)`; a plain `tunelab plan` stays
model-free and answers in seconds.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from tunelab.config import Config
from tunelab.data.encode import Encoded
from tunelab.strategies.registry import resolve

log = logging.getLogger(__name__)
WARMUP_STEPS = 1  # the first step allocates the optimizer's states and warms the allocator
MIN_STEPS, MAX_STEPS, STEP_BUDGET_S = 3, 8, 2.0  # timed steps: at least 3, more while under 2 s


def _cut_config(config: Any, layers: int) -> Any:
    """The model's config with only its first `layers` decoder layers."""
    cut = copy.deepcopy(config)
    text = cut.get_text_config() if hasattr(cut, "get_text_config") else cut
    text.num_hidden_layers = layers
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = text.layer_types[:layers]
    cut.use_cache = False
    return cut


def _median_step_seconds(step: Callable[[], None]) -> float:
    for _ in range(WARMUP_STEPS):
        step()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MIN_STEPS or (len(times) < MAX_STEPS and time.perf_counter() - start < STEP_BUDGET_S):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _quantized_as_configured(model: Any, cfg: Config) -> Any:
    """The cut copy quantized as strategy.lora.quantize asks (through a temporary folder: transformers quantizes as
    it loads), so that its steps dequantize as training's do; the copy itself without it."""
    if cfg.strategy.lora.quantize is None:
        return model
    import tempfile

    from transformers import AutoModelForCausalLM

    from tunelab.models.load import quantized_loading
    from tunelab.models.quantize import quantized_as_configured

    with tempfile.TemporaryDirectory(prefix="tunelab-timing-") as tmp:
        model.save_pretrained(tmp)
        quantized = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32,
                                                         attn_implementation=model.config._attn_implementation,
                                                         **quantized_loading(cfg.strategy.lora, "cpu"))
    quantized.config.use_cache = False
    return quantized_as_configured(quantized, cfg.strategy.lora, "cpu")


def time_cut_model(cfg: Config, model_config: Any, layers: int, examples: list[Encoded], tokenizer: Any) -> float:
    """Median seconds of one optimizer step of `cfg`'s strategy and batches with a `layers`-layer copy of the model:
    the training session set up as the recipe sets it up (on the CPU, with random weights), its steps the
    recipe's own `take_step`."""
    from transformers import AutoModelForCausalLM

    from tunelab.models.load import attention_implementation, pad_token_id
    from tunelab.train.loop import take_step
    from tunelab.train.session import open_session, prepare_model, setup_device

    hw = setup_device(cfg.train.model_copy(update={"device": "cpu"}))  # seeded, denormals flushed, as training does
    base = AutoModelForCausalLM.from_config(_cut_config(model_config, layers), dtype=torch.float32,
                                            trust_remote_code=cfg.model.trust_remote_code,
                                            attn_implementation=attention_implementation(cfg.model.attn_implementation, "cpu",
                                                                                         model_config))
    model = prepare_model(_quantized_as_configured(base, cfg), cfg, tokenizer, hw.device)
    session = open_session(cfg, model, examples, pad_token_id(tokenizer), hw, steps=WARMUP_STEPS + MAX_STEPS)
    return _median_step_seconds(lambda: take_step(session))  # a step: its batches, the update, the host sync


def measured_step_seconds(cfg: Config, layers: int, examples: list[Encoded], tokenizer: Any) -> float:
    """The seconds of one optimizer step of the whole `layers`-layer model on this CPU, from cut copies.

    One layer and up to three layers are timed: one more layer costs (t3 - t1) / 2, and the whole
    model t3 + (layers - 3) of that. When only the top k layers train (`freeze.trainable_layers`),
    a frozen layer below them (forward only: no gradient flows below the lowest trained layer) and
    a trained layer cost differently, so a third copy separates them.
    """
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)

    def timed(n: int, trainable_layers: int | None = None) -> float:
        c = cfg
        if trainable_layers is not None:
            c = cfg.for_strategy(cfg.strategy.name, {"strategy.freeze": {"trainable_layers": trainable_layers}})
        return time_cut_model(c, model_config, n, examples, tokenizer)

    log.info("timing %s steps on this CPU with cut copies of the model (%d layers)", cfg.strategy.name, layers)
    k = cfg.strategy.freeze.trainable_layers if resolve(cfg.strategy).base == "chosen" else None
    if k and k < layers and layers >= 2:
        one = timed(1, 1)  # head + a trained layer
        frozen = timed(2, 1) - one  # + a frozen layer below it
        trained = timed(2, 2) - one  # + another trained layer
        return one + (layers - k) * max(0.0, frozen) + (k - 1) * max(0.0, trained)
    big = min(layers, 3)
    t_big = timed(big, min(k, big) if k else None)
    if big == 1:
        return t_big
    per_layer = max(0.0, (t_big - timed(1, 1 if k else None)) / (big - 1))
    return t_big + (layers - big) * per_layer
