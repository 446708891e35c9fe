"""Load a causal LM and its tokenizer from a local Hugging Face folder (or, online, a hub id).

Safe by default: no remote code unless `model.trust_remote_code`, and no pickle weights unless
`model.allow_pickle`, because unpickling a file can run arbitrary code.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from tunelab.config import ModelConfig
from tunelab.errors import ModelError

log = logging.getLogger(__name__)
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.ckpt", "tf_model.h5")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what a tokenizer is built from: tokenizers' own file, or the files of a slow tokenizer to convert
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def check_weights(folder: str | Path) -> None:
    """Every *.safetensors file of `folder` opens and holds all the bytes its header promises.

    A truncated download or an interrupted copy otherwise surfaces as a SafetensorError deep inside
    transformers or peft; this names the file. Only the headers are read (the tensors are mapped).
    """
    from safetensors import SafetensorError, safe_open

    for f in sorted(Path(folder).expanduser().glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"weights file '{f}' is damaged or incomplete ({exc}). It was probably cut short by an "
                             "interrupted download or copy: download the model again, or re-export it.") from None


def check_tokenizer_files(path: str) -> None:
    """A local folder must hold a tokenizer: tokenizer.json (or a slow tokenizer's files to convert)."""
    p = Path(path).expanduser()
    if not p.is_dir() or (p / "tokenizer.json").is_file():
        return
    present = [n for n in TOKENIZER_FILES if (p / n).is_file()] + [f.name for f in p.glob("*.tiktoken")]
    if not present:
        raise ModelError(f"model folder '{path}' has no tokenizer files: tunelab expects tokenizer.json (a fast "
                         "tokenizer), or tokenizer.model / vocab.json + merges.txt / vocab.txt to convert from. Copy "
                         "the tokenizer files from where the model came from into the folder.")


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """A peft adapter folder's adapter_config.json, checked: a JSON object with peft_type and
    base_model_name_or_path (a damaged file otherwise surfaces as a JSONDecodeError or KeyError)."""
    import json

    path = Path(folder) / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"'{path}' cannot be read as JSON ({exc}): the adapter folder is damaged. Copy it again, "
                         "or re-export the run (tunelab export).") from None
    missing = [k for k in ("peft_type", "base_model_name_or_path") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ModelError(f"'{path}' has no {' or '.join(missing)}: it is not a complete peft adapter config. Copy "
                         "the adapter folder again, or re-export the run.")
    return cfg


def check_model_folder(path: str, allow_pickle: bool = False) -> bool:
    """Validate a local model folder; returns False when `path` is not local (a hub id to pass through)."""
    p = Path(path).expanduser()
    if not p.exists():
        if HUB_ID.match(path) and not path.startswith((".", "/", "~")):
            return False
        raise ModelError(f"model folder '{path}' does not exist. Set model.path to a local Hugging Face model folder "
                         "(with config.json, *.safetensors and tokenizer files).")
    if not p.is_dir():
        if p.suffix.lower() == ".gguf":
            raise ModelError(f"model.path '{path}' is a GGUF file; tunelab trains Hugging Face folders. Convert it "
                             f"once with `tunelab convert gguf {path} OUT_DIR` and set model.path to OUT_DIR.")
        raise ModelError(f"model.path '{path}' is a file; it must be a folder with config.json, weights and tokenizer files.")
    if not (p / "config.json").is_file():
        raise ModelError(f"model folder '{path}' has no config.json, so it is not a Hugging Face model folder. "
                         "(A llama2.c checkpoint converts with `tunelab convert llama2c MODEL.bin TOKENIZER.bin OUT_DIR`.)")
    has_safetensors = any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").is_file()
    has_pickle = any((p / name).is_file() for name in PICKLE_NAMES) or any(p.glob("pytorch_model-*.bin"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise ModelError(f"model folder '{path}' holds only pickle weights (pytorch_model*.bin), and loading a pickle "
                         "file can run arbitrary code. Convert them to safetensors, or set model.allow_pickle: true "
                         "if you trust the file.")
    if not has_safetensors and not has_pickle and not (p / "adapter_config.json").is_file():
        raise ModelError(f"model folder '{path}' has config.json but no weights file (*.safetensors).")
    return True


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    p = Path(cfg.path).expanduser()
    if not (p.is_dir() and ((p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file())):
        check_model_folder(cfg.path, cfg.allow_pickle)  # names what is wrong with the folder
    check_tokenizer_files(cfg.path)
    try:
        tok = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        if "sentencepiece" in str(exc) or "tiktoken" in str(exc):  # slow tokenizer files, nothing to convert them
            raise ModelError(f"model folder '{cfg.path}' has no tokenizer.json, and its slow tokenizer files cannot be "
                             "converted to one without the sentencepiece (or tiktoken) package. Install it "
                             "(pip install sentencepiece), or add the model's tokenizer.json to the folder.") from None
        raise ModelError(f"cannot load a tokenizer from '{cfg.path}': {exc}") from None
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"the tokenizer in '{cfg.path}' is a slow (Python) tokenizer; tunelab needs a fast one "
                         "(tokenizer.json) for character offsets.")
    if tok.eos_token is None:
        raise ModelError(f"the tokenizer in '{cfg.path}' has no EOS token, so targets cannot end and generation cannot "
                         "stop. Set \"eos_token\" in its tokenizer_config.json.")
    return tok


def _causal_lm_class(config: Any) -> Any:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:  # remote code: its own class, not in transformers' table
        return None


def attention_implementation(requested: str, device_type: str, config: Any = None) -> str:
    """`auto`: flash-attn's variable-length kernel on CUDA where installed, else tunelab's varlen SDPA, where the
    architecture can use them; else the architecture's own attention.

    Packed rows are kept apart on every path: `tunelab_varlen` runs SDPA per packed example,
    flash-attn reads the example bounds from the restarting position ids, and for `sdpa`,
    `eager` or `flex_attention` transformers builds a block-diagonal causal mask from them. An
    architecture whose attention does not go through transformers' attention interface (Falcon's and
    Bloom's own classes, with ALiBi) cannot take tunelab_varlen; one with an attention-logit soft cap
    (Gemma 2) cannot take SDPA, so it gets eager attention; one with a sliding window (Gemma 3, Mistral
    where set) gets SDPA with transformers' masks, which keep the window.
    """
    from tunelab.models.attention import VARLEN

    if requested != "auto":
        return requested
    if config is not None:
        cls = _causal_lm_class(config)
        if cls is not None and not getattr(cls, "_supports_attention_backend", False):
            return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text, "attn_logit_softcapping", None):
            return "eager"
        if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
            return "sdpa"  # transformers' masks keep the window within each packed example; tunelab_varlen has none
    if device_type == "cuda":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return VARLEN


def quantized_loading(quantize: Any, device_type: str, storage_dtype: Any = None) -> dict[str, Any]:
    """from_pretrained's arguments for a bitsandbytes-quantized base (`quantize`: the strategy.lora settings
    quantize, double_quant, compute_dtype), placed on its device as it loads; {} when quantize is unset."""
    if quantize is None or quantize.quantize is None:
        return {}
    import torch

    from tunelab.models.quantize import bitsandbytes_config

    place = {"": torch.cuda.current_device()} if device_type == "cuda" else "cpu"
    return {"quantization_config": bitsandbytes_config(quantize.quantize, quantize.double_quant,
                                                       quantize.compute_dtype, device_type, storage_dtype),
            "device_map": place}


def load_model(cfg: ModelConfig, dtype: Any = None, device_type: str = "cpu", quantize: Any = None,
               storage_dtype: Any = None) -> Any:
    """The causal LM in training-ready form (float32 master weights unless `dtype` says otherwise); with `quantize`
    (strategy.lora's quantize settings) its linear layers bitsandbytes-quantized, frozen (models/quantize.py)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    local = check_model_folder(cfg.path, cfg.allow_pickle)
    if local:
        check_weights(cfg.path)
    try:
        config = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path, config=config, trust_remote_code=cfg.trust_remote_code, dtype=dtype or torch.float32,
            use_safetensors=None if cfg.allow_pickle or not local else True,
            attn_implementation=attention_implementation(cfg.attn_implementation, device_type, config),
            **quantized_loading(quantize, device_type, storage_dtype),
        )
    except (OSError, ValueError, ImportError) as exc:
        raise ModelError(f"cannot load a causal LM from '{cfg.path}': {exc}") from None
    model.config.use_cache = False
    if quantize is not None and quantize.quantize is not None:
        from tunelab.models.quantize import quantized_as_configured

        quantized_as_configured(model, quantize, device_type)
    return model


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant checkpointing), through the
    name this transformers has (`activation_checkpointing_enable` since 5.x; the older name is deprecated)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def pad_token_id(tokenizer: Any) -> int:
    """The id used to pad batches (its positions are masked, so EOS serves when there is no pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def stop_token_ids(tokenizer: Any, model: Any, stop_texts: list[str] = ()) -> list[int]:
    """The ids that end a generation: the tokenizer's EOS, the model's generation config's EOS ids (an instruct
    model's end-of-turn tokens are there), and each stop text that is one token (a chat template's end of turn)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    config_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += config_ids if isinstance(config_ids, list) else [config_ids] if config_ids is not None else []
    for text in stop_texts:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if len(tokens) == 1:
            ids.append(tokens[0])
    return list(dict.fromkeys(ids))


def cache_argument(model: Any) -> str:
    """The name under which the model's forward takes a KV cache: `cache` (transformers 5) or `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
