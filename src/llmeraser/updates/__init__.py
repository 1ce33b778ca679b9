"""Update methods in a registry (`base`), one module per family: `one_step` (first-order, newton), `along_path`
(rewind, path, refine), `choose` (auto). Importing this package registers them all."""

from llmeraser.updates import along_path, choose, one_step  # noqa: F401 (registration)
from llmeraser.updates.base import (
    METHODS,
    NEEDS,
    Method,
    RequestContext,
    UnlearnOptions,
    get_method,
    method_names,
    methods_help,
    register,
)

__all__ = ["METHODS", "NEEDS", "Method", "RequestContext", "UnlearnOptions", "get_method", "method_names",
           "methods_help", "register"]
