"""llama.cpp's own tooling, at the release of the installed llama-cpp-python: its converter and its quantizer.

The converter (`convert_hf_to_gguf.py`, its `conversion/` package and its own `gguf-py`) is not on PyPI, but
every llama-cpp-python source release vendors the llama.cpp commit that its runtime is built from. tunelab takes
the converter from that source release, pinned to the installed runtime's version: the file is written by the
same llama.cpp that loads and checks it, and nothing from llama.cpp is copied into tunelab's repository. pip
fetches the release once (`pip download`, PyPI only; pip's cache makes a second fetch free) and the four
converter parts (with llama.cpp's MIT licence) are kept in ~/.cache/tunelab/llama.cpp-VERSION. Where there is
no network, TUNELAB_LLAMA_CPP may name a llama.cpp checkout (or an unpacked release's vendor/llama.cpp) instead.

The quantizer is llama.cpp's C function `llama_model_quantize`, called through llama-cpp-python's bindings.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError

CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
# --outtype of the converter for the float types; the quantized types are made from the f16 file by the quantizer
FLOAT_TYPES = ("f32", "f16", "bf16")
QUANTIZED_TYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
QUANT_TYPES = (*FLOAT_TYPES, *QUANTIZED_TYPES)
INSTALL_HINT = "pip install 'tunelab[export]'"


def runtime_version() -> str:
    """The installed llama-cpp-python's version, or a TunelabError saying how to install it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        raise TunelabError("GGUF export needs llama.cpp's runtime, the llama-cpp-python package, which is not "
                           f"installed: run `{INSTALL_HINT}` (it builds llama.cpp from source once; pip keeps "
                           "the wheel in its cache).") from None


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tunelab"


def _has_converter(folder: Path) -> bool:
    return all((folder / part).exists() for part in CONVERTER_PARTS[:3])


def converter_dir() -> Path:
    """The folder holding llama.cpp's converter at the installed runtime's release (fetched once), or the
    llama.cpp checkout that TUNELAB_LLAMA_CPP names."""
    named = os.environ.get("TUNELAB_LLAMA_CPP")
    if named:
        if not _has_converter(Path(named)):
            raise TunelabError(f"TUNELAB_LLAMA_CPP='{named}' does not hold llama.cpp's converter "
                               f"({', '.join(CONVERTER_PARTS[:3])}). Point it at a llama.cpp checkout, or unset it "
                               "to fetch the converter of the installed llama-cpp-python release.")
        return Path(named)
    version = runtime_version()
    folder = cache_root() / f"llama.cpp-{version}"
    if not _has_converter(folder):
        _fetch_converter(version, folder)
    return folder


def download_source_release(version: str, dest: Path) -> Path:
    """llama-cpp-python's source release `version` (which vendors llama.cpp), downloaded into `dest` with pip (from
    its cache after the first time); a TunelabError where pip cannot fetch it."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           "--dest", str(dest), f"llama-cpp-python=={version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(Path(dest).glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        raise TunelabError(f"could not fetch llama.cpp's converter: `pip download llama-cpp-python=={version}` "
                           f"failed ({done.stderr.strip()[-400:]}). Connect to PyPI once, or set "
                           "TUNELAB_LLAMA_CPP to a llama.cpp checkout of the same release.")
    return archives[0]


def _fetch_converter(version: str, folder: Path) -> None:
    """Download llama-cpp-python's source release `version` with pip and keep only the converter's parts."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        archive = download_source_release(version, Path(tmp))
        staging = Path(tmp) / "converter"
        _extract_converter(archive, staging)
        if folder.exists():  # a concurrent fetch finished first
            return
        staging.rename(folder)


def _extract_converter(archive: Path, out: Path) -> None:
    with tarfile.open(archive) as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        prefix = f"{top}/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                   and m.name[len(prefix):].split("/")[0] in CONVERTER_PARTS and (m.isfile() or m.isdir())]
        for member in members:
            member.name = member.name[len(prefix):]
        tar.extractall(out, members=members, filter="data")
    assert _has_converter(out), f"{archive} has no vendor/llama.cpp converter"


def convert(model_dir: Path, out_file: Path, outtype: str) -> None:
    """Run llama.cpp's converter on a Hugging Face folder, writing `out_file` at a float `outtype`."""
    assert outtype in FLOAT_TYPES, outtype
    source = converter_dir()
    cmd = [sys.executable, "-m", "tunelab.export.convert_launch", str(source / "convert_hf_to_gguf.py"),
           str(model_dir), "--outfile", str(out_file), "--outtype", outtype]
    tunelab_root = str(Path(__file__).resolve().parents[2])  # convert_launch, from a checkout as well as an install
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(source), tunelab_root])}
    env.pop("NO_LOCAL_GGUF", None)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=source)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        message = f"llama.cpp's converter failed on '{model_dir}': {' | '.join(tail)}"
        if "No space left on device" in done.stderr:
            raise OSError(28, "No space left on device: " + message)
        raise RuntimeError(message)


def quantize(f16_file: Path, out_file: Path, quant: str) -> None:
    """llama.cpp's quantizer (`llama_model_quantize`) from a 16-bit GGUF to `quant`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZED_TYPES[quant])
    params.nthread = max(1, len(os.sched_getaffinity(0)))
    code = llama_cpp.llama_model_quantize(str(f16_file).encode(), str(out_file).encode(), params)
    if code != 0:
        if shutil.disk_usage(out_file.parent).free < 1 << 20:
            raise OSError(28, f"No space left on device: llama.cpp's quantizer failed writing '{out_file}'")
        raise RuntimeError(f"llama.cpp's quantizer returned {code} quantizing '{f16_file}' to {quant}")


@dataclass(frozen=True)
class FileFacts:
    """What llama.cpp's runtime reads from a GGUF's metadata and vocabulary (a vocabulary-only load, which reads no
    tensor: a fraction of a second, where parsing the vocabulary's arrays in Python takes seconds)."""

    metadata: dict[str, str]  # the keys asked for, as llama.cpp prints them (absent: not in the file)
    ends: list[bool]  # whether llama.cpp ends a generation at each id asked for (`llama_vocab_is_eog`)


def file_facts(gguf: Path, keys: tuple[str, ...] = (), ids: list[int] = ()) -> FileFacts:
    """Metadata `keys` of `gguf` and whether llama.cpp ends a generation at each of `ids` as it reads the file: EOS,
    the EOT and EOM ids, and the end-of-turn texts llama.cpp knows by name."""
    import ctypes

    import llama_cpp

    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), _vocab_only_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not read the vocabulary of '{gguf}'")
    try:
        metadata = {}
        for key in keys:
            size = 1 << 12
            while True:  # the value's length is returned; a longer one is read again into a buffer that holds it
                buf = ctypes.create_string_buffer(size)
                length = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, size)
                if length < size:
                    break
                size = length + 1
            if length >= 0:
                metadata[key] = buf.value.decode("utf-8")
        vocab = llama_cpp.llama_model_get_vocab(model)
        return FileFacts(metadata, [bool(llama_cpp.llama_vocab_is_eog(vocab, i)) for i in ids])
    finally:
        llama_cpp.llama_model_free(model)


def ends_generation(gguf: Path, ids: list[int]) -> list[bool]:
    """Whether llama.cpp's runtime ends a generation at each of `ids`, as it reads the file."""
    return file_facts(gguf, ids=ids).ends


def _vocab_only_params() -> object:
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    return params


SPECIAL_END_SLOTS = ("eot", "eom")  # the GGUF keys beside EOS that llama.cpp ends a generation at


def mark_end_ids(gguf: Path, ids: list[int], end_ids: list[int]) -> None:
    """Rewrite `gguf` with `ids` as its end-of-turn (and end-of-message) token ids, through llama.cpp's own
    gguf_new_metadata.py, so that llama.cpp ends a generation at ids it does not know by name. A place that already
    holds one of the trained `end_ids` (the converter sets EOT from some templates) is kept."""
    keys = {slot: f"tokenizer.ggml.{slot}_token_id" for slot in SPECIAL_END_SLOTS}
    metadata = file_facts(gguf, tuple(keys.values())).metadata
    held = {slot: int(metadata[key]) for slot, key in keys.items() if key in metadata}
    free = [slot for slot in SPECIAL_END_SLOTS if held.get(slot) not in end_ids]
    if len(ids) > len(free):
        raise TunelabError(f"the run ends a turn at {len(ids)} ids that llama.cpp does not know ({ids}), and a GGUF "
                           f"file has {len(free)} free places for them (of EOT and EOM) beside EOS. Nothing was "
                           "written; ask llama.cpp users to pass the end of turn as a stop string instead.")
    script = converter_dir() / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"
    marked = gguf.with_name(gguf.name + ".marked")
    cmd = [sys.executable, str(script), str(gguf), str(marked), "--force"]
    for slot, token_id in zip(free, ids):
        cmd += ["--special-token-by-id", slot, str(token_id)]
    env = {**os.environ}
    env.pop("NO_LOCAL_GGUF", None)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        marked.unlink(missing_ok=True)
        message = f"llama.cpp's gguf_new_metadata.py failed on '{gguf}': {done.stderr.strip()[-400:]}"
        if "No space left on device" in done.stderr:
            raise OSError(28, "No space left on device: " + message)
        raise RuntimeError(message)
    marked.replace(gguf)
