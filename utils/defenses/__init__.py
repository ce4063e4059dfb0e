"""Defenses: the purification modes and their loop (`purify`), SAM/PAM (`sharpness`) and the
BTI-DBF trigger inversion (`bti`)."""
# the baselines register their purification modes at import
from utils.defenses import anp  # noqa: F401,E402
from utils.defenses import i_bau  # noqa: F401,E402
