"""Benchmarks (run as scripts: ``python bench/<name>.py``); a package so the bench task loads by dotted path."""
