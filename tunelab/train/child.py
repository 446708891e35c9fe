"""A training run in a child process of its own, so that its peak memory is its own (how `compare` trains each
strategy).

The children are forked from a small server process (`python -m tunelab.train.child`, started on first use and
ended with the parent) that has imported tunelab's training code once: torch, transformers and peft take seconds to
import, which a fresh interpreter spent before every strategy's run (about 5 s on this project's 2-core machine). A
child's peak resident memory is a fresh interpreter's: it starts with the server's resident pages, which hold those
imports and nothing else (the library pages the imports touched are touched again in the child, which a fork alone
does not map, so that they count in its resident set as they would in a fresh process's: 65 MB on this machine).
The server runs no torch operation itself, so a fork starts no thread pool twice. Where the platform cannot fork
(Windows), each run is a fresh `python -m tunelab train`.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

_server: subprocess.Popen | None = None


def resident_file_pages() -> list[int]:
    """The addresses of this process's resident pages of mapped files (its libraries' code and data), read from
    /proc/self/pagemap; empty where there is none (not Linux)."""
    page = os.sysconf("SC_PAGE_SIZE")
    pages: list[int] = []
    try:
        with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
            for line in maps:
                parts = line.split()
                if len(parts) < 6 or not parts[5].startswith("/") or not parts[1].startswith("r"):
                    continue
                start, end = (int(x, 16) for x in parts[0].split("-"))
                pagemap.seek(start // page * 8)
                entries = pagemap.read((end - start) // page * 8)
                pages += [start + k * page for k in range(len(entries) // 8) if entries[k * 8 + 7] & 0x80]  # present
    except OSError:
        return []
    return pages


def _touch(pages: list[int]) -> None:
    """Read a byte of each page, which maps it into this process's resident set."""
    import ctypes

    for address in pages:
        ctypes.c_char.from_address(address).value  # noqa: B018


def _run(config_path: str, environ: dict[str, str], cwd: str, log_path: str, server_pages: list[int]) -> int:
    """In the forked child: the server's resident file pages touched, its output into `log_path`, the parent's
    environment and folder, then `tunelab train`; returns the exit code `tunelab train` would."""
    _touch(server_pages)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(environ)  # as the parent has it now, not as it was when the server started
    os.chdir(cwd)
    import torch

    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # torch was imported before this environment was set
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from tunelab.config import load_config
    from tunelab.errors import RunFault, TunelabError
    from tunelab.train.loop import train

    try:
        train(load_config(config_path))
        return 0
    except (TunelabError, RunFault) as exc:
        print(f"tunelab: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, RunFault) else 2
    except BaseException:  # noqa: BLE001 (the child must end with a code, never return into the server's loop)
        import traceback

        traceback.print_exc()
        return 1


def serve(requests: IO[str], replies: IO[str]) -> None:
    """The server: import the training code, then fork one child per request line (JSON: _run's arguments) and
    reply with its exit code; ends when `requests` closes."""
    import tunelab.train.loop  # noqa: F401  (what every child would otherwise import itself)

    pages = resident_file_pages()
    for line in requests:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _run(**json.loads(line), server_pages=pages)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


def _started_server() -> subprocess.Popen:
    global _server
    if _server is None or _server.poll() is not None:
        root = str(Path(__file__).resolve().parents[2])  # this tunelab, whatever put it on the parent's path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        _server = subprocess.Popen([sys.executable, "-m", "tunelab.train.child"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        atexit.register(_stop, _server)
    return _server


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.stdin.close()
        server.wait()


def train_in_child(config_path: Path, log_path: Path) -> tuple[int, str]:
    """`tunelab train CONFIG` in a child process, its output in `log_path`; (its exit code, the last line it
    printed: the error where it failed)."""
    request: dict[str, Any] = {"config_path": str(config_path), "environ": dict(os.environ), "cwd": os.getcwd(),
                               "log_path": str(log_path)}
    if hasattr(os, "fork"):
        server = _started_server()
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        reply = server.stdout.readline()
        code = json.loads(reply)["exit"] if reply else 1  # no reply: the server itself died
    else:
        with open(log_path, "w", encoding="utf-8") as log:
            code = subprocess.run([sys.executable, "-m", "tunelab", "train", str(config_path)], stdout=log,
                                  stderr=subprocess.STDOUT).returncode
    text = Path(log_path).read_text(encoding="utf-8", errors="replace") if Path(log_path).is_file() else ""
    lines = text.strip().splitlines()
    return code, lines[-1] if lines else ""


if __name__ == "__main__":
    serve(sys.stdin, sys.stdout)
