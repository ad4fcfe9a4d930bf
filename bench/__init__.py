"""Benchmarks: each a script (``python bench/NAME.py``) and a module, so tests import their pure
parts (``from bench import serve_load``) like any other code."""
