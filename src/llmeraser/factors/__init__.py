"""Fitted curvature for the adapter's linear maps: K-FAC, EK-FAC, Woodbury and DataInf, fitted once and reused.

By idea: `capture` (the hooked pass and what it accumulates), `kronecker` (kfac, ekfac), `gram` (woodbury, datainf),
`fit` (`Factors`, `fit_factors`), `store` (on disk, keyed by the adapter's and the training set's hashes), `memory`
(where a fit keeps what it needs, and the sketch it falls back to when N × p does not fit), `sketch` (woodbury's
Nyström fallback). See docs/fit-on-device.md.
"""

from llmeraser.factors.capture import Block, example_generators, linear_blocks
from llmeraser.factors.fit import FISHERS, HELP, KINDS, FactorArguments, Factors, fit_factors
from llmeraser.factors.store import FactorStore, default_store

__all__ = ["Block", "FISHERS", "FactorArguments", "FactorStore", "Factors", "HELP", "KINDS", "default_store",
           "example_generators", "fit_factors", "linear_blocks"]
