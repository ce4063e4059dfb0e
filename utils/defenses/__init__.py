"""Defenses: the purification modes and their loop (`purify`), SAM/PAM (`sharpness`) and the
BTI-DBF trigger inversion (`bti`)."""

# the baselines register their modes when the package is imported
import utils.defenses.ep  # noqa: E402,F401
import utils.defenses.fp  # noqa: E402,F401
import utils.defenses.clp  # noqa: E402,F401
