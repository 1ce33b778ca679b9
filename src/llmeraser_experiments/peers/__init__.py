"""Peer libraries behind our interfaces, for side-by-side benchmark rows (optional dependencies)."""
