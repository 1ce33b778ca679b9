"""Experiments built on the library, a client of it outside its package: the benchmark harness, the MovieLens and
fictitious-people task builders, the corruptions that make query-modification and response-correction requests, the
demo, the memorised-people case, the peer implementations the benchmarks compare against, and the commands they add
to `llmeraser` as a plug-in (`commands`: `data movielens`, `data people`, `corrupt`, `demo`). The library
(`llmeraser`) never imports this package (tests/test_layering.py)."""
