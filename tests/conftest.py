"""Shared fixtures: the real stories260K model converted once per session, and small config helpers."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the encoded-data cache of this test process (and the processes it starts), not the user's
if "TUNELAB_DATA_CACHE" not in os.environ:
    os.environ["TUNELAB_DATA_CACHE"] = tempfile.mkdtemp(prefix="tunelab-test-cache-")
    atexit.register(shutil.rmtree, os.environ["TUNELAB_DATA_CACHE"], True)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on this 2-core machine: each computes on one thread (and so do
    # the processes it starts, unless a test sets their environment), so that the two never oversubscribe the
    # cores. stories260K's matrices are too small for a second intra-op thread to pay off.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(relative: str) -> Path:
    """A file of ../shared/data, or skip the test with a message naming it."""
    path = SHARED / relative
    if not path.is_file():
        pytest.skip(f"needs {path} (the shared public data folder beside the checkout)")
    return path


@pytest.fixture(scope="session")
def stories260k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K converted to a Hugging Face Llama folder (once per test session)."""
    from tunelab.models.llama2c import convert_llama2c

    model = shared_file("stories260K/stories260K.bin")
    tok = shared_file("stories260K/tok512.bin")
    return convert_llama2c(model, tok, tmp_path_factory.mktemp("stories260K"))


@pytest.fixture(scope="session")
def tokenizer(stories260k: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stories260k)


def train_in_fresh_process(cfg_path: Path, threads: dict[str, str]) -> None:
    """`tunelab train CFG` in a fresh interpreter, whose peak resident memory is its own as a user's run's is (a child
    forked from a server that has done other work can read lower); `threads` is its compute-thread environment."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg_path)], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", **threads}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config_tree(model: Path, train_file: Path, out: Path, **sections: Any) -> dict[str, Any]:
    """A minimal valid config tree; `sections` are merged into model/data/strategy/train."""
    tree: dict[str, Any] = {
        "model": {"path": str(model)},
        "data": {"train": str(train_file), "max_length": 128},
        "strategy": {"name": "full"},
        "train": {"max_steps": 2, "learning_rate": 1e-3, "batch_size": 2, "seed": 0, "progress": False},
        "output_dir": str(out),
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            tree.setdefault(name, {}).update(values)
        else:
            tree[name] = values
    return tree


# Short prompt/completion pairs of very different lengths (for accumulation and resume tests).
VARIED_ROWS = [
    {"prompt": "Once upon a time there was a cat. " * (1 + (i * 7) % 9), "completion": " The end" + " again" * (i % 5)}
    for i in range(24)
]


# The files that take longest under `make test` (its --durations list), longest first: a scheduling hint only
# (a stale list costs wall time, never a result). Measured in the clean-clone run of 2026-12-07 evening: the demo's
# task 2 (about 165 s), banking77 (140 s), the QLoRA SmolLM2 file (125 s), the demo's task 3 (115 s), the distributed
# and export-families files (about 100 s each). The second file needs SmolLM2's conversion (on a cold cache it
# converts, with the export fixtures' runs, while the other worker runs the demo's longest task).
LONGEST_FIRST = ["test_demo_task_intent.py", "export/test_gguf_families.py", "evaluate/test_banking77_acceptance.py",
                 "real_model/test_qlora_smollm2.py", "test_demo_task_small_data.py", "train/test_distributed.py",
                 "export/test_gguf_parity_smollm2.py", "plan/test_validation.py", "test_demo_task_summary.py",
                 "test_bench_smoke.py", "train/test_qlora_distributed.py", "real_model/test_smollm2_training.py",
                 "train/test_recipe.py", "test_demo.py", "real_model/test_convert_gguf.py"]


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first, then the other slow tests, then the rest (a stable sort: files keep their order
    within each group), so that under `make test`'s two workers (`--dist loadfile --no-loadscope-reorder`: files
    are handed out in this order) the long files start at once and the short ones fill in around them, instead
    of one long file starting last and running alone."""
    tests_dir = Path(__file__).parent

    def rank(item: pytest.Item) -> tuple[int, int]:
        try:
            name = Path(item.path).relative_to(tests_dir).as_posix()
        except ValueError:
            name = ""
        first = LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
        return first, item.get_closest_marker("slow") is None

    items.sort(key=rank)


def crash_after_saving(monkeypatch: Any, step: int) -> Any:
    """Make training raise RuntimeError("simulated crash") right after it saves the checkpoint of `step` (a run
    killed there); returns the function that puts the real saving back."""
    from tunelab.train import checkpointer

    real_save = checkpointer.save_checkpoint

    def save_then_crash(run_dir: Path, at: int, *args: Any, **kwargs: Any) -> Any:
        real_save(run_dir, at, *args, **kwargs)
        if at == step:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(checkpointer, "save_checkpoint", save_then_crash)
    return lambda: monkeypatch.setattr(checkpointer, "save_checkpoint", real_save)
