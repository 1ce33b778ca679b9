"""Inverse-HVP solvers, registered by name."""
