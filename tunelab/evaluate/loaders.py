"""The model under evaluation: a Hugging Face folder, a peft adapter folder (or base + adapter),
or a tunelab run directory (whose config also says how the data was rendered in training)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tunelab.config import Config, ModelConfig, load_config
from tunelab.errors import ModelError
from tunelab.models.load import check_model_folder, check_weights, load_tokenizer, read_adapter_config
from tunelab.models.device import choose_device
from tunelab.runfiles import ADAPTER_CONFIG, RunFiles, is_run_dir, run_metrics, run_that_saved_adapter
from tunelab.strategies.model import TrainModel
from tunelab.strategies.registry import loaded_addition, resolve


@dataclass
class EvalModel:
    model: TrainModel
    tokenizer: Any
    name: str  # what was loaded, for reports
    run_config: Config | None = None  # the training run's config, when a run directory was given
    stop_texts: list[str] = field(default_factory=list)  # what ends an answer besides EOS (a chat turn's end)
    device_setting: str = "auto"  # the eval.device and eval.precision it was loaded with
    precision_setting: str = "auto"
    base_trained: bool = False  # its base weights trained too (prompt+LM tuning's adapter over its tuned base)

    @property
    def detachable(self) -> bool:
        """The adaptation comes off: a peft adapter or soft prompt over base weights that training left unchanged
        (not prompt+LM tuning, whose base weights trained too)."""
        if not self.model.is_peft or self.base_trained:
            return False
        return self.run_config is None or resolve(self.run_config.strategy).detachable


@contextmanager
def adaptation_off(em: EvalModel) -> Iterator[EvalModel]:
    """The tuned model with its adaptation taken off (peft's disable_adapter; a soft prompt not inserted): the base
    model's own behaviour, exactly, for a detachable adaptation."""
    if not em.detachable:
        raise ValueError(f"{em.name}: its adaptation does not come off (its base weights trained)")
    with loaded_addition(em.model.lm).detached(em.model.lm):
        yield replace(em, model=TrainModel(em.model.base, em.model.strategy), name=f"{em.name}, adaptation off")


def _wrap(lm: Any, strategy: str) -> TrainModel:
    """The loaded model as training saw it, its soft prompt (if any) entering where the addition puts it."""
    return TrainModel(lm, strategy, *loaded_addition(lm).slots(lm))


def _load_hf(path: str, trust_remote_code: bool = False) -> Any:
    from tunelab.models.load import load_model

    return load_model(ModelConfig(path=path, trust_remote_code=trust_remote_code))


def _run_config(run_dir: Path) -> Config:
    """The config a run wrote, validated."""
    return load_config(RunFiles(run_dir).config)


def _base_trained(adapter_dir: Path, base: str) -> bool:
    """Whether an adapter sits over base weights its own run trained (prompt+LM tuning's final/adapter over its
    final/base), read from the config of the run that saved it; an adapter of no run sits over an untrained base."""
    run = run_that_saved_adapter(adapter_dir, base)
    return run is not None and not resolve(_run_config(run).strategy).keeps_base_weights


def _find_model(p: Path, adapter: str | None) -> tuple[Any, Any, str, str, Config | None, bool]:
    """(the model, its tokenizer's folder, strategy, name, the run's config, whether its base trained) of what `p`
    names: a run directory, a peft adapter folder (or `p` with `adapter` on it), or a model folder."""
    from peft import PeftModel

    from tunelab.strategies.final import load_final

    run_config, base_trained, files = None, False, RunFiles(p)
    if is_run_dir(p) and adapter is None:  # a tunelab run directory
        run_config = _run_config(p)
        strategy = run_config.strategy.name
        if files.final.is_dir():
            lm = load_final(files.final, run_config.strategy.lora)  # over a quantized base if it trained on one
            tok_dir = files.final_tokenizer_dir()
        elif not resolve(run_config.strategy).trains_anything:  # prompting: the run holds only its rendering
            lm, tok_dir = _load_hf(run_config.model.path, run_config.model.trust_remote_code), run_config.model.path
        else:
            raise ModelError(f"run directory '{p}' has no final/ model: the run did not finish. Resume it, or "
                             "evaluate one of its checkpoints' base model.")
        name = f"{p} ({strategy})"
    elif adapter is not None or (p / ADAPTER_CONFIG).is_file():
        adapter_dir = Path(adapter) if adapter else p
        if not (adapter_dir / ADAPTER_CONFIG).is_file():
            raise ModelError(f"'{adapter_dir}' has no {ADAPTER_CONFIG}, so it is not a peft adapter folder.")
        adapter_cfg = read_adapter_config(adapter_dir)
        base = str(p) if adapter else adapter_cfg["base_model_name_or_path"]
        check_model_folder(base)
        check_weights(adapter_dir)
        lm = PeftModel.from_pretrained(_load_hf(base), adapter_dir)
        base_trained = _base_trained(adapter_dir, base)  # prompt+LM tuning: no untrained base to detach back to
        tok_dir, strategy, name = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base, \
            "adapter", f"{base} + {adapter_dir}"
    else:
        lm, tok_dir, strategy, name = _load_hf(str(p)), p, "model", str(p)
    return lm, tok_dir, strategy, name, run_config, base_trained


def load_for_eval(path: str, adapter: str | None = None, device: str | None = None,
                  precision: str | None = None) -> EvalModel:
    """Load what `path` names, ready for evaluation (eval mode, KV cache on) on the device (auto: a GPU when there is
    one, cuda or cpu) in the precision (auto: bf16 weights on a GPU that has it, bf16 or fp32) that
    tunelab.models.device decides; None: the run directory's eval: section, else auto."""
    p = Path(path)
    lm, tok_dir, strategy, name, run_config, base_trained = _find_model(p, adapter)
    tokenizer = load_tokenizer(ModelConfig(path=str(tok_dir)))
    settings = run_config.eval if run_config else None
    device = device or (settings.device if settings else "auto")
    precision = precision or (settings.precision if settings else "auto")
    choice = choose_device(device, precision, key="eval.device")
    model = _wrap(lm, strategy).to(choice.device).eval()
    if choice.autocast_dtype is not None:  # the weights only: buffers such as RoPE's inverse frequencies stay float32
        for param in model.parameters():
            if param.is_floating_point():  # a quantized base's integer codes stay as they are
                param.data = param.data.to(choice.autocast_dtype)
    model.base.config.use_cache = True
    return EvalModel(model, tokenizer, name, run_config, trained_turn_end(p) if run_config else [], device, precision,
                     base_trained)


def trained_turn_end(run_dir: Path) -> list[str]:
    """The end of turn the run trained (its metrics' data row), when it is not the EOS token."""
    data_row = run_metrics(run_dir).first("data")
    end = data_row.get("turn_end") if data_row else None
    return [end] if end else []
