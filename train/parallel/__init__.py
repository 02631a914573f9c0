"""Parallelism applied from outside the model (issue 3)."""
