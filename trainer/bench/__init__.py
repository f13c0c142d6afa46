"""The benchmark behind scripts/bench.py: our loop against Model.fit, checkpoint overhead in
the real loop, and the 300 MB state's save costs (BENCHMARKS.md).

May import anything in trainer; nothing in trainer imports it (tests/test_layout.py).
"""
