"""`tunelab export RUN_DIR OUT --format gguf`: a finished run as one GGUF file that llama.cpp, Ollama and LM Studio
load, written by llama.cpp's own converter and quantizer (tunelab/export/llamacpp.py).

OUT is a new folder holding model-QUANT.gguf and export.json (what was carried: the chat template, the end of
turn and its ids, the llama.cpp release). Every check that can refuse runs before anything is written, and OUT
appears in one rename: an export that fails half-way (a full disk) leaves no file under OUT's name.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunelab.errors import TunelabError
from tunelab.export import llamacpp
from tunelab.export.families import Family, family_of
from tunelab.export.merge import check_mergeable, write_merged
from tunelab.export.source import RunSource, read_run

SUMMARY = "export.json"


@dataclass
class GgufExport:
    """What an export wrote."""

    out_dir: Path
    gguf: Path
    quant: str
    family: Family
    carried: dict[str, Any] = field(default_factory=dict)  # chat_template, turn_end, end_ids


def gguf_name(quant: str) -> str:
    return f"model-{quant}.gguf"


def check_quant(quant: str) -> str:
    if quant not in llamacpp.QUANT_TYPES:
        raise TunelabError(f"--quant '{quant}' is not a type tunelab exports: choose one of "
                           f"{', '.join(llamacpp.QUANT_TYPES)} (f32 and f16 answer as the tuned model does; q8_0 and "
                           "q4_k_m go through llama.cpp's quantizer and move the answers a little).")
    return quant


def check_output(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise TunelabError(f"'{out_dir}' already exists; an export writes a new folder. Pass --overwrite to replace "
                           "it (the old one stays until the new one is complete), or choose another OUT.")
    if out_dir.exists() and not out_dir.is_dir():
        raise TunelabError(f"'{out_dir}' is a file, and an export writes a folder there. Choose another OUT.")


def prepare(run_dir: Path, out_dir: Path, quant: str, overwrite: bool) -> tuple[RunSource, Family]:
    """Every refusal, before anything is written: the quant type, final/, the architecture, what cannot be
    merged, an existing OUT, and llama.cpp's tooling (installed and its converter at hand)."""
    check_quant(quant)
    source = read_run(run_dir)
    family = family_of(source.architecture, str(source.final))
    check_mergeable(source)
    check_output(out_dir, overwrite)
    llamacpp.converter_dir()
    return source, family


def _write_gguf(source: RunSource, quant: str, tmp: Path) -> dict[str, Any]:
    """Merge into a scratch folder beside OUT, convert (f32 first where the quantizer follows), quantize."""
    with tempfile.TemporaryDirectory(prefix=".tunelab-merge-", dir=tmp.parent) as scratch:
        hf_dir = Path(scratch) / "hf"
        carried = write_merged(source, hf_dir)
        target = tmp / gguf_name(quant)
        if quant in llamacpp.FLOAT_TYPES:
            llamacpp.convert(hf_dir, target, quant)
        else:
            full = Path(scratch) / "model-f32.gguf"
            llamacpp.convert(hf_dir, full, "f32")
            llamacpp.quantize(full, target, quant)
    unknown = [i for i, ends in zip(carried["end_ids"], llamacpp.ends_generation(target, carried["end_ids"]))
               if not ends]
    if unknown:  # an end of turn llama.cpp does not know by name: given the file's EOT (and EOM) places
        llamacpp.mark_end_ids(target, unknown, carried["end_ids"])
    carried["marked_end_ids"] = unknown
    return carried


def check_carried(gguf: Path, carried: dict[str, Any]) -> None:
    """The file holds the chat template exactly as trained, an EOS that ends the trained turn, and llama.cpp ends a
    generation at every id that ends a trained turn (checked in the written file as llama.cpp reads it, not assumed
    from the converter)."""
    facts = llamacpp.file_facts(gguf, ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id"), carried["end_ids"])
    if facts.metadata.get("tokenizer.chat_template") != carried["chat_template"]:
        raise RuntimeError(f"llama.cpp's converter wrote a chat template that differs from the trained one in {gguf}")
    eos = facts.metadata.get("tokenizer.ggml.eos_token_id")
    if eos is None or int(eos) not in carried["end_ids"]:
        raise RuntimeError(f"{gguf}: EOS id {eos} is not among the trained end-of-turn ids {carried['end_ids']}")
    if not all(facts.ends):
        raise RuntimeError(f"{gguf}: llama.cpp would not end a generation at the trained end-of-turn ids "
                           f"{[i for i, e in zip(carried['end_ids'], facts.ends) if not e]}")


def export_gguf(run_dir: Path, out_dir: Path, quant: str = "f16", overwrite: bool = False,
                also: Callable[[Path, dict[str, Any]], None] | None = None) -> GgufExport:
    """Write OUT/model-QUANT.gguf (and export.json) for a finished run; `also(tmp, carried)` writes more files
    into the folder before it takes OUT's name (the Ollama Modelfile)."""
    from tunelab.train.checkpoint import atomic_dir

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    source, family = prepare(run_dir, out_dir, quant, overwrite)
    carried: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        carried.update(_write_gguf(source, quant, tmp))
        check_carried(tmp / gguf_name(quant), carried)
        summary = {"run_dir": str(run_dir.resolve()), "format": "gguf", "quant": quant, "family": family.name,
                   "llama_cpp_python": llamacpp.runtime_version(), **carried}
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        if also is not None:
            also(tmp, carried)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    atomic_dir(out_dir, write)
    return GgufExport(out_dir, out_dir / gguf_name(quant), quant, family, carried)



def read_summary(out_dir: Path) -> dict[str, Any]:
    """An export's export.json: what it carried into the file."""
    return json.loads((Path(out_dir) / SUMMARY).read_text())
