"""Defenses: the purification modes and their loop (`purify`), SAM/PAM (`sharpness`) and the
BTI-DBF trigger inversion (`bti`)."""
