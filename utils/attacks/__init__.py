"""Attacks: the registry, the trigger and poisoning helpers, and one module per attack.

Importing this package registers every attack (each member module calls `register_attack` when
imported). `from utils import attacks` then gives the registry: `attacks.get_attack(name)`,
`attacks.ATTACKS`, `attacks.make_trigger(...)`.
"""
from utils.attacks.registry import (ATTACKS, AttackSpec, Params, PrepareContext, TrainingHooks, get_attack, make_trigger,
                                    register_attack)
from utils.attacks import badnet, blended, bypass, inputaware, lc, lf, sig, ssba, wanet  # noqa: F401,E402  (they register themselves)

__all__ = ["ATTACKS", "AttackSpec", "Params", "PrepareContext", "TrainingHooks", "get_attack", "make_trigger", "register_attack"]
