"""User-facing errors: one line, a name to point at, exit code 2, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (config, data, model path...). The CLI prints it on one line.

    The message names what is wrong: the config field (``train.lr``) or the ``file:line``.
    """

    exit_code = 2


class ConfigError(UserError):
    """An invalid config file, key or value."""


class DataError(UserError):
    """A dataset that cannot be used: malformed row, missing fields, empty, all labels masked."""


class ModelError(UserError):
    """A model that cannot be loaded: missing path, unavailable hub id, incompatible tokenizer."""
