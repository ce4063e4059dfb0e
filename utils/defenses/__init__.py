"""Defenses: the purification modes and their loop (`purify`), SAM/PAM (`sharpness`) and the
BTI-DBF trigger inversion (`bti`); the baselines, one module each, register their modes on import."""
from utils.defenses import nad  # noqa: F401,E402  (registers nad)
from utils.defenses import nc  # noqa: F401,E402  (registers nc)
