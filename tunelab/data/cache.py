"""The on-disk cache of encoded data: one folder per encoding, named by the hash of everything that changes it.

An entry is written into a temporary folder and published by one `rename`, so a folder under its key is
always complete: an encode killed half-way leaves only a temporary folder, which no later run reads (and the
next run on the same cache removes once its writer is gone). Two writers of the same key both finish; the
second one's rename fails against the first one's folder, and it reads that one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tunelab.processes import process_alive

log = logging.getLogger(__name__)

# tunelab's encoding version: raise it whenever the encoding of the same inputs changes (rendering, label mask,
# truncation, the columns of the table)
ENCODING_VERSION = 5  # 4: few-shot demonstrations seeded by the file's name, not its path; 5: reasoning chat templates
_TMP = ".tmp-"


def default_cache_dir() -> Path:
    """TUNELAB_DATA_CACHE, else under the user's cache folder (XDG_CACHE_HOME, else ~/.cache)."""
    if os.environ.get("TUNELAB_DATA_CACHE"):
        return Path(os.environ["TUNELAB_DATA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tunelab" / "encoded"


def file_fingerprint(path: str | Path, cache_dir: Path) -> str:
    """The sha256 of a file's bytes. The hash is kept beside the cache under the file's path, size and mtime, so
    that an unchanged file is hashed once; a changed size or mtime hashes it again."""
    p = Path(path).resolve()
    st = p.stat()
    index_path = cache_dir / "file-hashes.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    known = index.get(str(p))
    if known and known["stamp"] == stamp:
        return known["sha256"]
    digest = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    index[str(p)] = {"stamp": stamp, "sha256": digest.hexdigest()}
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(index_path, json.dumps(index))
    return index[str(p)]["sha256"]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """The sha256 of what decides a tokenizer's ids: its whole serialized form (vocabulary, merges, normalizer,
    pre-tokenizer, post-processor, added tokens), its special tokens and its chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    digest.update(json.dumps({"class": type(tokenizer).__name__, "special": tokenizer.special_tokens_map,
                              "chat_template": getattr(tokenizer, "chat_template", None)},
                             sort_keys=True, default=str).encode())
    return digest.hexdigest()


def encoding_key(parts: dict[str, Any]) -> str:
    """The cache key of an encoding: the hash of its inputs (and the encoding version) as canonical JSON."""
    text = json.dumps({"version": ENCODING_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def lookup(cache_dir: Path, key: str) -> Path | None:
    """The complete entry of `key`, or None."""
    entry = cache_dir / key
    return entry if (entry / "meta.json").is_file() else None


def new_entry(cache_dir: Path, key: str) -> Path:
    """A temporary folder to write the entry of `key` into (then `publish` it); stale ones of dead writers go."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(cache_dir)
    return Path(tempfile.mkdtemp(prefix=f"{_TMP}{key}-{os.getpid()}-", dir=cache_dir))


def publish(tmp: Path, cache_dir: Path, key: str, meta: dict[str, Any]) -> Path:
    """Make the finished temporary folder the entry of `key` (meta.json is written last, inside it)."""
    _write_atomic(tmp / "meta.json", json.dumps(meta))
    entry = cache_dir / key
    try:
        tmp.rename(entry)
    except OSError:  # another writer published the same key first: its entry is as good as this one
        if lookup(cache_dir, key) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def read_meta(entry: Path) -> dict[str, Any]:
    return json.loads((entry / "meta.json").read_text())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _remove_abandoned(cache_dir: Path) -> None:
    """Remove temporary folders whose writer process is gone (killed mid-encode)."""
    for tmp in cache_dir.glob(f"{_TMP}*"):
        try:
            pid = int(tmp.name[len(_TMP):].split("-")[1])
        except (IndexError, ValueError):
            continue
        if not process_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
