"""Diagnostics of a model: linear probes on a captions file's splits (`pvl-search probe`; the probes
themselves are pvl_search.training.probes), twin accuracy, shape readouts."""
