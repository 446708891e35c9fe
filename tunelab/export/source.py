"""What an export starts from: a finished run's final/ and how the run rendered its data (its chat template as
trained, its end of turn), read once and checked before anything is written."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.runfiles import ADAPTER_CONFIG, CONFIG, FINAL, FINAL_ADAPTER, FINAL_BASE, RunFiles



@dataclass(frozen=True)
class RunSource:
    """A finished run as an export sees it."""

    run_dir: Path
    config: Any  # the run's validated Config, or None for a bare final/ without config.yaml
    model_config: dict[str, Any]  # config.json of the model under final/ (or of the adapter's base)
    adapter_config: dict[str, Any] | None  # final/'s peft adapter_config.json, where final/ is an adapter
    tokenizer_dir: Path

    @property
    def final(self) -> Path:
        return self.run_dir / FINAL

    @property
    def start_model_dir(self) -> Path | None:
        """The model folder the run started from (its tokenizer files as the model shipped them), where it is a
        folder here: an adapter's base as final/ recorded it (an absolute path), else the config's model.path."""
        candidates = [self.adapter_config["base_model_name_or_path"]] if self.adapter_config is not None else []
        candidates += [self.config.model.path] if self.config is not None else []
        return next((Path(c).expanduser() for c in candidates if Path(c).expanduser().is_dir()), None)

    @property
    def architecture(self) -> str:
        return (self.model_config.get("architectures") or [self.model_config.get("model_type", "unknown")])[0]


def _model_config_of(final: Path, adapter: dict[str, Any] | None) -> dict[str, Any]:
    folder = final / FINAL_BASE if (final / FINAL_BASE).is_dir() else final
    if adapter is not None and not (final / FINAL_BASE).is_dir():
        folder = Path(adapter["base_model_name_or_path"])
    path = folder / "config.json"
    if not path.is_file():
        raise TunelabError(f"'{path}' does not exist: the model that '{final}' was trained on is not there any more "
                           "(an adapter's base_model_name_or_path in adapter_config.json). Put the base model back at "
                           "that path, or edit the path in adapter_config.json.")
    return json.loads(path.read_text())


def read_run(run_dir: Path) -> RunSource:
    """The run's final/ and config, or a TunelabError that says what is missing."""
    from tunelab.config import load_config
    from tunelab.models.load import read_adapter_config

    run_dir = Path(run_dir)
    final = run_dir / FINAL
    if not final.is_dir():
        raise TunelabError(f"'{run_dir}' has no final/ folder: it is not a finished tunelab run (a run writes final/ "
                           "when it ends; tuning-free prompting has nothing to export). Finish or resume the run, or "
                           "pass the run directory that holds final/.")
    adapter_dir = final / FINAL_ADAPTER if (final / FINAL_ADAPTER).is_dir() else final
    adapter = read_adapter_config(adapter_dir) if (adapter_dir / ADAPTER_CONFIG).is_file() else None
    config = None
    if (run_dir / CONFIG).is_file():
        config = load_config(RunFiles(run_dir).config)
    return RunSource(run_dir, config, _model_config_of(final, adapter), adapter, adapter_dir)


def renders_chat(source: RunSource) -> bool:
    """Whether the run rendered its data through a chat template (else a discrete template, or plain text)."""
    from tunelab.data.render import spec_from_config
    from tunelab.data.table import first_shape

    if source.config is None:
        return True
    spec = spec_from_config(source.config)
    if spec.mode != "auto":
        return spec.mode == "chat"
    data = source.config.data.sources()[0]
    return first_shape(data.path, data) == "chat"


def trained_chat_template(source: RunSource, tokenizer: Any) -> str | None:
    """The chat template the run trained with (its config's, else its tokenizer's, else tunelab's fallback), or
    None where it rendered its data with a discrete template."""
    from tunelab.data.render import FALLBACK_CHAT_TEMPLATE

    if not renders_chat(source):
        return None
    configured = source.config.data.chat_template if source.config is not None else None
    template = configured or tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
    return with_thinking_mode(template, source.config.data.enable_thinking) if source.config is not None else template


def with_thinking_mode(template: str, enable_thinking: bool) -> str:
    """A reasoning template (one that reads `enable_thinking`, as Qwen3's does) with the run's thinking mode set at
    its top, so that llama.cpp, Ollama or any other runtime renders the prompts the run trained on whatever it
    passes: Qwen3's template left to itself thinks, and adds no empty think block to the generation prompt, where
    tunelab (data.enable_thinking: false by default) trained with one. Other templates are returned as they are."""
    if "enable_thinking" not in template:
        return template
    return f"{{%- set enable_thinking = {'true' if enable_thinking else 'false'} -%}}\n" + template


def trained_turn_end(source: RunSource, tokenizer: Any) -> str:
    """The text that ends an answer as the run trained it: the chat template's end of turn, or EOS."""
    from tunelab.data.render import RenderSpec, spec_from_config, turn_end

    spec = spec_from_config(source.config) if source.config is not None else RenderSpec(mode="chat")
    return turn_end(spec, tokenizer, renders_chat(source))
