"""The real-model tier: SmolLM2-135M-Instruct (../shared/data/smollm2_135m_instruct, one GGUF file), converted to a
Hugging Face folder by `tunelab convert gguf` once and kept in a cache keyed by what the folder depends on.

The key is the GGUF file's SHA-256, the converter's source and the versions of transformers and gguf (whose
loader does the dequantizing): a changed file or converter converts again, an unchanged one never does. A file
lock makes the conversion happen once when `make test`'s two workers ask for it at the same time. The cache
lives in $TUNELAB_TEST_MODEL_CACHE, by default tunelab-test-models/ in the system's temporary folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import shared_file

SMOLLM2_GGUF = "smollm2_135m_instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(gguf_file: Path) -> str:
    """What the converted folder depends on: the file, the converter and the loader's versions."""
    from importlib.metadata import version

    import tunelab.models.gguf as converter

    parts = [_sha256(gguf_file), _sha256(Path(converter.__file__)), version("transformers"), version("gguf")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def test_model_cache() -> Path:
    """The folder that keeps what the tests make once per machine: $TUNELAB_TEST_MODEL_CACHE, by default
    tunelab-test-models/ in the system's temporary folder."""
    root = Path(os.environ.get("TUNELAB_TEST_MODEL_CACHE") or Path(tempfile.gettempdir()) / "tunelab-test-models")
    root.mkdir(parents=True, exist_ok=True)
    return root


def made_once(name: str, make: Any) -> Path:
    """test_model_cache()/`name`, made by `make(folder)` into a temporary folder beside it and renamed into place, at
    most once per machine (under a file lock: two test workers wait for one)."""
    from filelock import FileLock

    root = test_model_cache()
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not folder.is_dir():
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                make(Path(tmp) / "made")
                (Path(tmp) / "made").rename(folder)
    return folder


def converted_gguf(gguf_file: Path) -> Path:
    """The folder `tunelab convert gguf` makes of `gguf_file`, converted at most once per cache key (under a
    file lock); the folders of older keys of the same file are removed (no other folder of the cache)."""
    from filelock import FileLock

    from tunelab.cli import main

    root = test_model_cache()
    folder = root / f"{gguf_file.stem}-{cache_key(gguf_file)}"
    with FileLock(str(root / f"{gguf_file.stem}.lock")):
        if not folder.is_dir():
            stale_name = re.compile(re.escape(gguf_file.stem) + r"-[0-9a-f]{16}")  # this cache's folders only
            for stale in root.iterdir():
                if stale.is_dir() and stale_name.fullmatch(stale.name):
                    shutil.rmtree(stale, ignore_errors=True)
            assert main(["convert", "gguf", str(gguf_file), str(folder)]) == 0
    return folder


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return shared_file(SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (float32, as converted)."""
    return converted_gguf(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)
