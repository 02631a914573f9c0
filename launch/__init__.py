"""Launch scripts and helpers."""
