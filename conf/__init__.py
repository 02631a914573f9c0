"""Hydra configs, shipped as package data (config path pkg://vdit.conf)."""
