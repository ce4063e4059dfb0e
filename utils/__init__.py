"""Shared library of the backdoor toolkit: data, triggers, training, records, purification."""
