"""Update methods in a registry (`base`), one module per family: `one_step` (first-order, newton), `along_path`
(rewind, path, refine), `forget` (gradient-difference, npo, simnpo: no recording, a holdout's evidence to stop by),
`choose` (auto). Importing this package registers them all."""

from llmeraser.updates import along_path, choose, forget, one_step  # noqa: F401 (registration)
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
