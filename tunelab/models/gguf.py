"""Convert a GGUF file (llama.cpp's and Ollama's format) into a Hugging Face folder.

The conversion is transformers' own GGUF loader (`from_pretrained(folder, gguf_file=name)`, which needs the
`gguf` package): it dequantizes the weights and rebuilds the tokenizer, its special tokens and chat template
from the file's metadata. What tunelab adds around it: the file is checked before anything loads (not GGUF,
cut short, an architecture the loader cannot build as a causal LM) so that bad input gets one paragraph
instead of a numpy error; the generation config lists every id that ends a generation (a GGUF names one EOS;
llama.cpp stops at more, see `END_OF_GENERATION_TOKENS`); the quantization config is dropped (the saved
weights are plain floats); and the folder appears in one rename, so a failure leaves no half-written OUT_DIR.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Literal

from tunelab.errors import ModelError

GGUF_MAGIC = b"GGUF"
GgufDtype = Literal["float32", "bf16"]
# Tokens that end a generation wherever a vocabulary has them, besides the file's EOS, EOT and EOM ids: the
# end-of-generation set of llama.cpp (src/llama-vocab.cpp, `special_eog_ids`), which a GGUF was made to run in.
END_OF_GENERATION_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
                            "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>",
                            "<end_of_utterance>")
END_ID_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
# what a damaged file raises inside gguf's reader (numpy reshapes and views of a short memory map, mostly)
_READ_ERRORS = (ValueError, IndexError, OverflowError, KeyError, UnicodeDecodeError, struct.error, TypeError)


def _damaged(path: Path, detail: str) -> ModelError:
    return ModelError(f"'{path}' cannot be read as a GGUF file ({detail}): it is damaged or cut short, as an "
                      "interrupted download leaves it. Download it again (compare its size or SHA-256 with the "
                      "source's), then rerun the conversion.")


def read_gguf(path: Path) -> Any:
    """The file's `gguf.GGUFReader` (metadata parsed, tensors memory-mapped), or a ModelError that says whether
    the file is missing, not GGUF at all, or damaged."""
    from gguf import GGUFReader

    if not path.is_file():
        raise ModelError(f"GGUF file '{path}' does not exist (or is not a file). Pass the path of a .gguf file.")
    with path.open("rb") as fh:
        magic = fh.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ModelError(f"'{path}' is not a GGUF file: it does not start with the bytes 'GGUF' (it starts with "
                         f"{magic!r}). `tunelab convert gguf` takes a llama.cpp/Ollama .gguf model file; a Hugging "
                         "Face folder needs no conversion, and a llama2.c checkpoint converts with "
                         "`tunelab convert llama2c`.")
    try:
        return GGUFReader(path)
    except _READ_ERRORS as exc:
        raise _damaged(path, str(exc)) from None


def _field(reader: Any, key: str) -> Any:
    """One metadata value of the file (a string, a number, or a list for an array), or None when absent."""
    from transformers.modeling_gguf_pytorch_utils import read_field

    values = read_field(reader, key)
    return None if not values else values[0] if len(values) == 1 else values


def check_architecture(path: Path, reader: Any) -> str:
    """The file's architecture, if transformers' GGUF loader builds it; else a ModelError naming what it builds."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    architecture = _field(reader, "general.architecture")
    if not isinstance(architecture, str):
        raise _damaged(path, "its metadata has no general.architecture")
    known = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
    if architecture not in known:
        raise ModelError(f"'{path}' holds a '{architecture}' model, an architecture that transformers' GGUF loader "
                         f"cannot build (it builds {', '.join(known)}). Get this model as a Hugging Face folder "
                         "(config.json and safetensors) from where it was published, or a GGUF of a supported "
                         "architecture; a newer transformers may support more.")
    return architecture


def _check_causal_lm(path: Path, config: Any) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelError(f"'{path}' holds a '{config.model_type}' model, which is not a causal (decoder-only) "
                         "language model, so tunelab cannot train or generate with it. Convert a decoder-only model.")


def end_of_generation_ids(reader: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a generation: the file's EOS (and EOT, EOM where it names them), then each of
    llama.cpp's end-of-generation tokens that the vocabulary holds."""
    ids = [int(v) for v in (_field(reader, key) for key in END_ID_KEYS) if isinstance(v, int)]
    vocab = tokenizer.get_vocab()
    ids += [vocab[text] for text in END_OF_GENERATION_TOKENS if text in vocab]
    return list(dict.fromkeys(ids))


def _load(path: Path, dtype: GgufDtype) -> tuple[Any, Any]:
    """The model (weights dequantized to `dtype`) and tokenizer, through transformers' own GGUF loader."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name)
        _check_causal_lm(path, config)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, config=config,
                                                     dtype={"float32": torch.float32, "bf16": torch.bfloat16}[dtype])
    except ModelError:
        raise
    except (ValueError, NotImplementedError, OSError) as exc:
        raise ModelError(f"transformers' GGUF loader could not load '{path}': {exc}. If the file is complete, this "
                         "GGUF variant (its architecture or quantization type) is not supported by the installed "
                         "transformers and gguf packages: upgrade them, or get the model as a Hugging Face folder."
                         ) from None
    return model, tokenizer


def _write(model: Any, tokenizer: Any, end_ids: list[int], out: Path, source: dict[str, Any]) -> None:
    """save_pretrained the model and tokenizer into `out`, with a plain-float config and every end id."""
    if hasattr(model.config, "quantization_config"):  # the weights are dequantized now: nothing to re-quantize
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.generation_config.eos_token_id = end_ids if len(end_ids) > 1 else end_ids[0]
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "tunelab_source.json").write_text(json.dumps(source, indent=2) + "\n")


def convert_gguf(path: str | Path, out_dir: str | Path, dtype: GgufDtype = "float32") -> Path:
    """Write a Hugging Face folder (config, safetensors, tokenizer with its chat template, generation config)
    for the model in a GGUF file. float32 keeps the dequantized weights exactly (a quantized block's scale times
    its integer is a float32 value); bf16 halves the folder and rounds them."""
    path, out = Path(path).expanduser(), Path(out_dir).expanduser()
    if out.exists():
        raise ModelError(f"output folder '{out}' already exists; `tunelab convert gguf` writes a new folder and "
                         f"never overwrites one. Remove it, or pass another OUT_DIR for '{path}'.")
    reader = read_gguf(path)
    architecture = check_architecture(path, reader)
    model, tokenizer = _load(path, dtype)
    end_ids = end_of_generation_ids(reader, tokenizer)
    if not end_ids:
        raise ModelError(f"'{path}' names no EOS token and its vocabulary has none of llama.cpp's end-of-generation "
                         "tokens, so generation could not stop. Set tokenizer.ggml.eos_token_id in the file "
                         "(gguf's gguf_set_metadata.py), or get the model as a Hugging Face folder.")
    source = {"converted_from": "gguf", "file": str(path.resolve()), "architecture": architecture, "dtype": dtype,
              "file_type": _field(reader, "general.file_type"), "end_of_generation_ids": end_ids}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write(model, tokenizer, end_ids, tmp, source)
        tmp.rename(out)
    except BaseException:  # any failure (and Ctrl-C): no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
