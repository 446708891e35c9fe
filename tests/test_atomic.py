"""tunelab/atomic.py: what every stage writes whole (checkpoints, final/, the data cache, small JSON files) appears
whole or not at all, and what a dead writer left is cleared without touching a live writer's copy."""

from __future__ import annotations

import ast
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab import atomic
from tunelab.atomic import atomic_dir, atomic_write_text, remove_stale_temp
from tunelab.errors import DiskFullError


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_is_a_floor_module():
    """Every stage writes through it, so it imports the standard library and tunelab's floor only."""
    tree = ast.parse(Path(atomic.__file__).read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    tunelab = {m for m in modules if m and m.startswith("tunelab")}
    assert tunelab == {"tunelab.errors", "tunelab.processes"}
    assert all(m == "__future__" or m.split(".")[0] in sys.stdlib_module_names for m in modules - tunelab)


def test_a_folder_is_replaced_whole_or_kept(tmp_path):
    final = tmp_path / "final"
    atomic_dir(final, lambda tmp: (tmp / "a").write_text("one"))
    atomic_dir(final, lambda tmp: (tmp / "b").write_text("two"))  # replaced: the old folder's files are gone
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    atomic_dir(final, lambda tmp: (tmp / "c").write_text("three"), replace=False)  # another writer was first: kept
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no temporary copy left


def test_a_failed_write_leaves_the_old_version_and_no_temporary_copy(tmp_path):
    final = atomic_dir(tmp_path / "final", lambda tmp: (tmp / "weights").write_text("old"))

    def fail(tmp: Path) -> None:
        (tmp / "weights").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match="is full: writing 'final' failed"):
        atomic_dir(final, fail)
    with pytest.raises(KeyboardInterrupt):
        atomic_dir(final, lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert (final / "weights").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["final"]
    atomic_write_text(tmp_path / "ids.json", "new")
    assert (tmp_path / "ids.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["final", "ids.json"]


def test_stale_copies_of_dead_writers_go_and_a_live_writers_stay(tmp_path):
    gone, alive = dead_pid(), os.getppid()
    for name in (f".tmp-entry-{gone}", f".tmp-entry-{alive}", f".old-kept-{gone}", ".tmp-notes"):
        (tmp_path / name).mkdir()
    (tmp_path / f".tmp-ids.json-{gone}").write_text("half")  # a single file's temporary copy
    removed = remove_stale_temp(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-entry-" + str(alive), ".tmp-notes", "kept"]
    assert len(removed) == 3
