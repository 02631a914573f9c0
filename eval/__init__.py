"""Evaluation: sampling and metrics."""
