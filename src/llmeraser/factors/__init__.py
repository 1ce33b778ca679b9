"""Fitted curvature for the adapter's linear maps: K-FAC, EK-FAC, Woodbury and DataInf, fitted once and reused.

By idea: `capture` (the hooked pass and what it accumulates), `kronecker` (kfac, ekfac), `gram` (woodbury, datainf),
`fit` (`Factors`, `fit_factors`), `store` (on disk, keyed by the adapter's and the training set's hashes).
"""

from llmeraser.factors.capture import Block, example_generators, linear_blocks
from llmeraser.factors.fit import FISHERS, HELP, KINDS, FactorArguments, Factors, fit_factors
from llmeraser.factors.store import FactorStore, default_store

__all__ = ["Block", "FISHERS", "FactorArguments", "FactorStore", "Factors", "HELP", "KINDS", "default_store",
           "example_generators", "fit_factors", "linear_blocks"]
