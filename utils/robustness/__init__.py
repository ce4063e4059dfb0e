"""Robustness of purified models (NeurIPS 2024): the retuning attack (`retune`), the query-based
reactivation attack (`qra`) and the O-/P-ASR table (`table`)."""
