"""A run's final/ as one standalone Hugging Face folder for llama.cpp's converter: an adapter merged into a float
copy of its base (never into quantized weights), the tokenizer carrying the chat template the run trained with,
and the generation config listing every id that ends a turn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.export.source import RunSource, trained_chat_template, trained_turn_end


def check_mergeable(source: RunSource) -> None:
    """Refuse, before anything is written, what cannot become plain weights: a soft prompt, a quantized base."""
    from tunelab.strategies.registry import mergeable_peft_types

    adapter = source.adapter_config
    if adapter is not None and adapter["peft_type"] not in mergeable_peft_types():
        kind = adapter["peft_type"].lower().replace("_", " ")
        raise TunelabError(f"'{source.final}' is a {kind} adapter, which cannot go into a GGUF file: its learned "
                           "prompt is extra input (virtual tokens or prefix keys and values) computed at every call, "
                           "not a "
                           "change to any weight, so there is no weight to merge it into and llama.cpp has no way to "
                           "run it. Export it as a peft adapter instead (tunelab export RUN_DIR OUT), or train LoRA.")
    if source.model_config.get("quantization_config"):
        method = source.model_config["quantization_config"].get("quant_method", "quantized")
        raise TunelabError(f"the base model of '{source.final}' is stored {method}: merging an adapter into quantized "
                           "weights rounds the adapter away. Point the run's base at the model's 16- or 32-bit "
                           "weights (adapter_config.json's base_model_name_or_path) and export again.")


def _end_ids(tokenizer: Any, turn_end: str) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces = tokenizer(turn_end, add_special_tokens=False)["input_ids"] if turn_end else []
    if len(pieces) == 1:
        ids.append(pieces[0])
    return list(dict.fromkeys(ids))


def _add_legacy_config_keys(path: Path) -> None:
    """The config key llama.cpp's converter reads that transformers 5 no longer writes (GPT-2's n_ctx, which is
    n_positions), added beside the new one with the same value (GPT-NeoX's rope keys: export/convert_launch.py)."""
    import json

    config = json.loads(path.read_text())
    if config.get("model_type") == "gpt2":
        config.setdefault("n_ctx", config["n_positions"])
    path.write_text(json.dumps(config, indent=2) + "\n")


def _carry_tokenizer_files(tokenizer: Any, source_dir: Path | None, out: Path) -> dict[str, Any]:
    """What llama.cpp's converter reads of a tokenizer that transformers 5 no longer writes:
    - `added_tokens_decoder` in tokenizer_config.json: for a sentencepiece vocabulary the converter takes the
      types of added and special tokens (a chat template's markers) from there, and would otherwise leave them
      ordinary pieces that llama.cpp spells out byte by byte;
    - a sentencepiece model (tokenizer.model, which Llama-2-, Gemma- and Phi-3-style vocabularies are converted
      from), copied from the model the run started from;
    - the class the model shipped its tokenizer as (transformers 5 saves every fast tokenizer as
      TokenizersBackend; the converter picks Phi-4's BPE vocabulary over Phi-3's sentencepiece one by the name
      GPT2Tokenizer).
    Returns the tokenizer_config.json it wrote."""
    import json
    import shutil

    written = out / "tokenizer_config.json"
    config = json.loads(written.read_text(encoding="utf-8"))
    config.setdefault("added_tokens_decoder", {
        str(i): {"content": t.content, "special": t.special, "lstrip": t.lstrip, "rstrip": t.rstrip,
                 "normalized": t.normalized, "single_word": t.single_word}
        for i, t in sorted(tokenizer.added_tokens_decoder.items())})
    if source_dir is not None and source_dir.is_dir():
        if (source_dir / "tokenizer.model").is_file() and not (out / "tokenizer.model").is_file():
            shutil.copyfile(source_dir / "tokenizer.model", out / "tokenizer.model")
        shipped = source_dir / "tokenizer_config.json"
        shipped_class = json.loads(shipped.read_text(encoding="utf-8")).get("tokenizer_class") \
            if shipped.is_file() else None
        if shipped_class:
            config["tokenizer_class"] = shipped_class
    written.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return config


def _needs_sentencepiece(architecture: str, tokenizer_config: dict[str, Any]) -> bool:
    """llama.cpp's converter reads these families' vocabulary from tokenizer.model only (Phi-3 unless its tokenizer
    is Phi-4's GPT2Tokenizer)."""
    if architecture == "Phi3ForCausalLM":
        return tokenizer_config.get("tokenizer_class") != "GPT2Tokenizer"
    return architecture == "Gemma2ForCausalLM"


def merged_model(source: RunSource) -> Any:
    """The tuned model in float32 with any adapter folded into its weights: for a run over a quantized base
    (strategy.lora.quantize), into a float copy of the weights its quantized layers computed with, so that the
    merged model answers as the QLoRA model did (export/hf.py's merge_over_dequantized)."""
    from tunelab.strategies.final import load_final

    quantized = source.config.strategy.lora if source.config is not None else None
    if source.adapter_config is not None and quantized is not None and quantized.quantize is not None:
        from tunelab.export.hf import merge_over_dequantized

        return merge_over_dequantized(source.final, quantized)[1]
    model = load_final(source.final)
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def write_merged(source: RunSource, out: Path) -> dict[str, Any]:
    """Save the merged model and its tokenizer (with the trained chat template) to `out`; returns what was
    carried: the chat template, the end of turn and the ids that end a turn."""
    from transformers import AutoTokenizer

    check_mergeable(source)
    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_dir)
    template = trained_chat_template(source, tokenizer)
    tokenizer.chat_template = template
    turn_end = trained_turn_end(source, tokenizer)
    model = merged_model(source)
    end_ids = _end_ids(tokenizer, turn_end)
    model.config.use_cache = True
    model.generation_config.eos_token_id = end_ids if len(end_ids) > 1 else end_ids[0]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tokenizer_config = _carry_tokenizer_files(tokenizer, source.start_model_dir, out)
    if _needs_sentencepiece(source.architecture, tokenizer_config) and not (out / "tokenizer.model").is_file():
        raise TunelabError(f"the {source.architecture} model of '{source.final}' needs its sentencepiece model "
                           "(tokenizer.model) for llama.cpp's converter, and the folder the run started from "
                           f"({source.start_model_dir or 'not found'}) has none. Put the base model's tokenizer.model "
                           "into that folder (it ships with the model) and export again. Nothing was written.")
    _add_legacy_config_keys(out / "config.json")
    return {"chat_template": template, "turn_end": turn_end, "end_ids": end_ids}
