"""Benchmark cases shared by the pytest-benchmark files under bench/ and ``emalora-fast bench``.

Each case builds its inputs once and returns, per provider, a zero-argument callable that runs one
iteration; the timing harness (pytest-benchmark or :mod:`.timing`) stays outside.
"""
