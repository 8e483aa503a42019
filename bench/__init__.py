"""Neti's benchmark: kernel cost against fleet size, measured between network namespaces.

Not a test: nothing here asserts on time. ``make bench`` (or ``python -m bench.run``) runs it.
"""
