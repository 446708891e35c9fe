"""`tunelab export RUN_DIR OUT --format FORMAT`: each format's export, and what it prints."""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError

FORMATS = ("hf", "gguf", "ollama", "vllm")


def export_command(run_dir: Path, out_dir: Path, fmt: str, quant: str, overwrite: bool, merge: bool,
                   parity_file: str | None = None, parity_tokens: int = 32) -> str:
    """Run one export and return the lines to print (the command that serves the result, the parity figures)."""
    if fmt == "hf":
        from tunelab.evaluate.inputs import quantized_run_settings
        from tunelab.export.hf import export_run

        quantized, prompts = quantized_run_settings(run_dir) if merge else (None, [])  # a QLoRA run: parity prompts
        return f"{export_run(run_dir, out_dir, merge, quantized, prompts)}: {out_dir}"
    if fmt == "vllm":
        from tunelab.export.vllm import export_vllm

        command = export_vllm(run_dir, out_dir, overwrite)
        return f"wrote a vLLM-ready copy of final/ to {out_dir} (checked for vLLM's LoRA loader); serve it with:\n" \
               f"  {command}"
    if fmt not in ("gguf", "ollama"):
        raise TunelabError(f"--format '{fmt}' is not one tunelab writes: choose one of {', '.join(FORMATS)}.")
    lines = [_export_gguf_or_ollama(run_dir, out_dir, fmt, quant, overwrite)]
    if parity_file:
        from tunelab.export.gguf import gguf_name
        from tunelab.export.parity import run_parity

        lines.append("parity against the tuned model, in llama.cpp's runtime: " + run_parity(
            run_dir, out_dir / gguf_name(quant), parity_file, parity_tokens).summary())
    return "\n".join(lines)


def _export_gguf_or_ollama(run_dir: Path, out_dir: Path, fmt: str, quant: str, overwrite: bool) -> str:
    from tunelab.export.gguf import export_gguf, gguf_name, prepare

    if fmt == "gguf":
        done = export_gguf(run_dir, out_dir, quant, overwrite)
        return f"wrote {done.gguf} ({done.family.name}, {quant}; chat template and end of turn " \
               f"{done.carried['turn_end']!r} carried); run it with:\n  llama-cli -m {done.gguf}"
    from tunelab.export.ollama import ollama_template, write_modelfile

    source, _ = prepare(run_dir, out_dir, quant, overwrite)
    go, caveat = ollama_template(source)  # refuses before anything is written
    done = export_gguf(run_dir, out_dir, quant, overwrite,
                       also=lambda tmp, carried: write_modelfile(tmp, gguf_name(quant), go, source, carried))
    name = Path(run_dir).resolve().name
    return f"wrote {done.gguf} and its Modelfile (template checked against the chat template" \
           f"{'; ' + caveat if caveat else ''}); load it with:\n" \
           f"  ollama create {name} -f {(out_dir / 'Modelfile').resolve()}"
