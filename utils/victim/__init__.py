"""Victims: a backdoor experiment built from its config or rebuilt from a record (`experiment`), and
its training into a record (`train`, the driver behind `attack/*.py`)."""
