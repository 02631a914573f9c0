"""Metrics: pure functions over uint8 (T, H, W, 3) videos; the registry selects them by name.

flicker.py (VBench temporal flickering), motion.py (static filter, dynamic degree, smoothness,
jerk), flow.py (OpenCV / RAFT optical flow), consistency.py + backbones.py (subject/background
consistency), quality.py (aesthetic, imaging quality, CLIPSIM), physics_iq.py (Physics-IQ port),
distribution.py (Frechet distance, MMD, FVD), registry.py (names, aggregation, score_set).
See docs/metrics.md.
"""
