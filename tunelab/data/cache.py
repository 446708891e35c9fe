"""The on-disk cache of encoded data: one folder per encoding, named by the hash of everything that changes it.

An entry is written into a temporary folder and published by one `rename` (`tunelab.atomic.atomic_dir`), so a
folder under its key is always complete: an encode killed half-way leaves only a temporary folder, which no
later run reads (and the next run on the same cache removes once its writer is gone). Two writers of the same
key both finish; the second one's rename fails against the first one's folder, and it reads that one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.atomic import atomic_dir, atomic_write_text, remove_stale_temp

log = logging.getLogger(__name__)

# tunelab's encoding version: raise it whenever the encoding of the same inputs changes (rendering, label mask,
# truncation, the columns of the table)
ENCODING_VERSION = 5  # 4: few-shot demonstrations seeded by the file's name, not its path; 5: reasoning chat templates


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
    atomic_write_text(index_path, json.dumps(index))
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


def store(cache_dir: Path, key: str, write: Callable[[Path], dict[str, Any]]) -> Path:
    """Write the entry of `key` atomically and return it: `write(folder)` fills the folder and returns its meta
    (written last, as meta.json). What killed writers left in the cache goes first. When another writer
    published the same key meanwhile, its entry is kept and this one dropped: the two are the same encoding."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(cache_dir)

    def fill(folder: Path) -> None:
        meta = write(folder)
        atomic_write_text(folder / "meta.json", json.dumps(meta))

    return atomic_dir(cache_dir / key, fill, replace=False)


def read_meta(entry: Path) -> dict[str, Any]:
    return json.loads((entry / "meta.json").read_text())
