"""The models one server answers for: one base model in memory, the run or model it was started with, and the
adapters of other runs over that same base (peft's multi-adapter switching), each with its own rendering.

LoRA-family adapters (LoRA, DoRA, (IA)^3: one peft type per server) are loaded into one PeftModel over the base
and switched with `set_adapter`; the base answers inside `disable_adapter`. A soft-prompt run (prompt tuning,
P-tuning, prefix tuning) leaves the base's weights alone, so it gets its own PeftModel around the same base module
and generates through TrainModel as `tunelab generate` does, with the LoRA group switched off."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from tunelab.config import ModelConfig, load_config
from tunelab.data.render import turn_end
from tunelab.errors import ModelError
from tunelab.evaluate.inputs import Inputs
from tunelab.evaluate.loaders import EvalModel, load_for_eval, trained_turn_end
from tunelab.models.load import load_tokenizer, read_adapter_config
from tunelab.runfiles import ADAPTER_CONFIG, FINAL_ADAPTER, RunFiles, is_run_dir
from tunelab.strategies.model import TrainModel
from tunelab.strategies.registry import SOFT_PROMPT, addition_of_peft_type


@dataclass
class Served:
    """One model name of the API: what generates it, and how its requests are rendered."""
    name: str
    em: EvalModel
    inputs: Inputs
    lora_adapter: str | None  # the LoRA-group adapter made active for it; None: the LoRA group switched off
    source: str  # the run directory or model folder it came from

    @property
    def context_length(self) -> int:
        """Positions the model can attend to (prompt, soft prompt and answer together)."""
        config = self.em.model.config
        return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))

    @property
    def virtual_tokens(self) -> int:
        """Positions a soft prompt takes before the prompt's tokens."""
        model = self.em.model
        if model.virtual_tokens or model.prefix:
            return int(model.lm.peft_config[model.lm.active_adapter].num_virtual_tokens)
        return 0


class ModelPool:
    """The served models by name; `active` readies the shared base for one of them (one batch at a time)."""

    def __init__(self, served: list[Served], lora: Any = None) -> None:
        self.served = {s.name: s for s in served}
        self.lora = lora  # the PeftModel holding the LoRA-group adapters, or None
        self.tokenizer_lock = threading.Lock()  # requests render while the worker decodes: one at a time

    @property
    def names(self) -> list[str]:
        return list(self.served)

    def get(self, name: str) -> Served | None:
        return self.served.get(name)

    @contextmanager
    def active(self, served: Served) -> Iterator[EvalModel]:
        """The shared base switched to `served`'s adapter (or none) while the block generates."""
        if self.lora is None:
            yield served.em
        elif served.lora_adapter is not None:
            self.lora.set_adapter(served.lora_adapter)
            yield served.em
        else:
            with self.lora.disable_adapter():
                yield served.em


def _plain(em: EvalModel) -> Inputs:
    """A plain model's rendering: its own chat template, whose end of turn ends a reply (as `tunelab generate`)."""
    inputs = Inputs(None)
    em.stop_texts = [turn_end(inputs.spec, em.tokenizer, True)]
    return inputs


def _inputs(em: EvalModel) -> Inputs:
    return Inputs(em.run_config) if em.run_config is not None else _plain(em)


def _weights_folder(path: Path) -> Path:
    """The folder of base weights under what `path` names: an adapter's base, a run's final/, or the folder."""
    final = RunFiles(path).final if is_run_dir(path) else path
    if (final / ADAPTER_CONFIG).is_file():
        return Path(read_adapter_config(final)["base_model_name_or_path"]).resolve()
    if final.is_dir() and (final / "config.json").is_file():
        return final.resolve()
    cfg = load_config(RunFiles(path).config)
    return Path(cfg.model.path).resolve()  # a prompting run: its model, untouched


def _adapter_folder(name: str, run_dir: Path, base: Path) -> Path:
    """final/ of a run whose strategy saved a peft adapter over `base`, or a ModelError saying why not."""
    final = RunFiles(run_dir).final
    if not is_run_dir(run_dir):
        raise ModelError(f"--adapter {name}={run_dir}: not a tunelab run directory (no config.yaml).")
    if (final / FINAL_ADAPTER).is_dir():
        raise ModelError(f"--adapter {name}={run_dir}: a prompt+LM run trained its base weights too, so it is not an "
                         "adapter over the served base: serve it on its own (tunelab serve RUN_DIR).")
    if not (final / ADAPTER_CONFIG).is_file():
        raise ModelError(f"--adapter {name}={run_dir}: its final/ holds no peft adapter (a full or freeze run is a "
                         "model of its own, or the run did not finish): serve it as MODEL instead.")
    adapter_base = Path(read_adapter_config(final)["base_model_name_or_path"]).resolve()
    if adapter_base != base:
        raise ModelError(f"--adapter {name}={run_dir}: trained over '{adapter_base}', but the served base is '{base}'. "
                         "Adapters share one base: serve runs over another base in another server.")
    return final


def _to_host(module: Any, host: EvalModel) -> None:
    """Newly loaded adapter weights onto the device and float precision the host model runs in."""
    ref = next(p for p in host.model.parameters() if p.is_floating_point())  # not a 4-bit base's uint8 codes
    for param in module.parameters():
        dtype = ref.dtype if param.data.is_floating_point() else param.dtype
        param.data = param.data.to(ref.device, dtype)
    module.eval()


class _Loader:
    """Builds the pool: the host model, then each adapter onto its base."""

    def __init__(self, host: EvalModel, base_folder: Path) -> None:
        self.host = host
        model = host.model
        self.soft_host = model.virtual_tokens > 0 or model.prefix
        self.lora = model.lm if model.is_peft and not self.soft_host else None
        self.base_lm = model.base if model.is_peft else model.lm  # the transformers model (LoRA layers injected)
        self.base_folder = base_folder

    def add_adapter(self, name: str, run_dir: Path) -> Served:
        from peft import PeftModel

        final = _adapter_folder(name, run_dir, self.base_folder)
        cfg = load_config(RunFiles(run_dir).config)
        peft_type = str(read_adapter_config(final)["peft_type"])
        tokenizer = load_tokenizer(ModelConfig(path=str(final if (final / "tokenizer_config.json").is_file()
                                                        else self.base_folder)))
        if addition_of_peft_type(peft_type) is SOFT_PROMPT:
            peft = PeftModel.from_pretrained(self.base_lm, final, adapter_name=name)
            _to_host(peft.prompt_encoder, self.host)
            model = TrainModel(peft, cfg.strategy.name, *SOFT_PROMPT.slots(peft))
            lora_adapter = None
        else:
            self._load_lora(name, final, peft_type)
            model, lora_adapter = TrainModel(self.lora, cfg.strategy.name), name
        em = EvalModel(model, tokenizer, f"{run_dir} ({cfg.strategy.name})", cfg, trained_turn_end(run_dir))
        return Served(name, em, Inputs(cfg), lora_adapter, str(run_dir))

    def _load_lora(self, name: str, final: Path, peft_type: str) -> None:
        from peft import PeftModel

        if self.lora is None:
            self.lora = PeftModel.from_pretrained(self.base_lm, final, adapter_name=name)
        else:
            if peft_type != str(getattr(self.lora.peft_type, "value", self.lora.peft_type)):
                raise ModelError(f"--adapter {name}: a {peft_type} adapter cannot join the {self.lora.peft_type} "
                                 "adapters already served over this base (peft switches adapters of one type): "
                                 "serve it from a second server.")
            self.lora.load_adapter(final, adapter_name=name)
        _to_host(self.lora, self.host)


def load_pool(model: str, adapters: list[tuple[str, str]], name: str | None = None, device: str | None = None,
              precision: str | None = None) -> ModelPool:
    """Load MODEL (a run directory or model folder) once and the `(name, run_dir)` adapters onto its base."""
    host = load_for_eval(model, device=device, precision=precision)
    loader = _Loader(host, _weights_folder(Path(model)))
    host_name = name or Path(model).resolve().name
    host_adapter = loader.lora.active_adapter if loader.lora is not None else None
    served = [Served(host_name, host, _inputs(host), host_adapter, model)]
    if host.detachable:  # the base under the run's adapter answers too, as the plain model it is
        base = EvalModel(TrainModel(loader.base_lm, "model"),
                         load_tokenizer(ModelConfig(path=str(loader.base_folder))), str(loader.base_folder))
        served.append(Served("base", base, _plain(base), None, str(loader.base_folder)))
    for adapter_name, run_dir in adapters:
        if adapter_name in {s.name for s in served}:
            raise ModelError(f"--adapter {adapter_name}=...: the name '{adapter_name}' is already served "
                             f"({', '.join(s.name for s in served)}); choose another.")
        served.append(loader.add_adapter(adapter_name, Path(run_dir)))
    return ModelPool(served, loader.lora)
