"""Errors a user can act on.

Every problem caused by the user's input (files, config, model folder) is raised as a
`TunelabError`: the CLI prints its message as one paragraph and exits with code 2, without a
traceback. A fault that stops a run part-way (`RunFault`: a NaN loss, a full disk) is printed the
same way with exit code 1. Internal invariants use `assert`.
"""

from __future__ import annotations


class TunelabError(ValueError):
    """Bad input or bad config: the message says what is wrong, where, and what to do."""


class ConfigError(TunelabError):
    """The configuration is invalid (unknown key, wrong type, impossible combination)."""


class DataError(TunelabError):
    """A data file is missing, malformed, or has records that cannot be trained on."""


class ModelError(TunelabError):
    """A model folder, weights file or tokenizer is missing or cannot be used."""


class RunFault(RuntimeError):
    """A run stopped by a fault at run time, not by bad input (a non-finite loss, a full disk).

    The message says at which step, what was kept (the newest complete checkpoint) and how to go on.
    The CLI prints it as one paragraph and exits with code 1 (2 stays "fix your input"), without a
    traceback.
    """


class NonFiniteError(RunFault):
    """The loss or the gradient norm became NaN or infinite (`train.on_nonfinite` says what happens)."""


class DiskFullError(RunFault):
    """A write failed because its disk (or quota) is full; `path` is what was being written."""

    def __init__(self, message: str, path: object = None):
        super().__init__(message)
        self.path = path
