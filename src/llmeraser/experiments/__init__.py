"""Experiments built on the library, kept apart from it: the benchmark harness, the MovieLens task builder, the
corruptions that make query-modification and response-correction requests, the demo, and the peer implementations
the benchmarks compare against. The core (everything outside this package) never imports it."""
