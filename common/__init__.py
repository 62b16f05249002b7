"""The common layer: one-line errors, dataclass -> command-line flags, logging, whole files. Every package
imports it; it imports none of them (tests/test_layers.py).
"""
