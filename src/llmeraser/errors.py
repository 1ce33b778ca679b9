"""Exception classes. Every message names the bad value and what was expected.

`UserInputError` subclasses (bad files, ids, adapters, options) map to exit code 2 in the CLI;
`LLMEraserRuntimeError` subclasses (a solver that diverges, non-finite values) to exit code 1.
"""

from __future__ import annotations


class LLMEraserError(Exception):
    """Base class of every error this library raises on purpose."""


class UserInputError(LLMEraserError, ValueError):
    """The input (a file, an id, an option) is wrong; the user can fix it."""


class DataError(UserInputError):
    """A training-data file is malformed (the message names the file and line)."""


class RequestError(UserInputError):
    """An unlearning request is malformed or does not fit the training set."""


class AdapterError(UserInputError):
    """An adapter is missing, mismatched with the base model, or holds non-finite weights."""


class ConfigError(UserInputError):
    """An option has a value outside its allowed range."""


class ResourceError(UserInputError):
    """The work would not fit in memory; the message names an option that does."""


class LLMEraserRuntimeError(LLMEraserError, RuntimeError):
    """The computation failed (not the user's input)."""


class SolverError(LLMEraserRuntimeError):
    """A solver diverged, met non-finite values, or met negative curvature."""
