"""Errors a user can act on.

Every problem caused by the user's input (files, config, model folder) is raised as a
`TunelabError`: the CLI prints its message as one paragraph and exits with code 2, without a
traceback. Internal invariants use `assert`.
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
