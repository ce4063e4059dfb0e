"""Defenses: the purification modes and their loop (`purify`), SAM/PAM (`sharpness`) and the
BTI-DBF trigger inversion (`bti`); the baselines, one module each, register their modes when the
package is imported, in the order of the NeurIPS 2024 paper's tables."""
from utils.defenses import ep  # noqa: F401  (registers ep)
from utils.defenses import anp  # noqa: F401  (registers anp)
from utils.defenses import i_bau  # noqa: F401  (registers i-bau)
from utils.defenses import nad  # noqa: F401  (registers nad)
from utils.defenses import fp  # noqa: F401  (registers fp)
from utils.defenses import clp  # noqa: F401  (registers clp)
from utils.defenses import nc  # noqa: F401  (registers nc)
