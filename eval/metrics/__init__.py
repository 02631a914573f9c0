"""Metrics: pure functions over uint8 (T, H, W, 3) videos."""
