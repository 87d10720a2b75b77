"""Diagnostics of a model: linear probes, twin accuracy."""
