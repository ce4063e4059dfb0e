"""A run's recipe: the settings that shape its numbers, so that only runs differing in nothing but their
seeds are treated as replicates (utils.analysis.results, utils.plots pratio, utils.robustness_table).

A recipe is a flat dict: the victim's config.yaml keys bare, then each run on top of it with its kind's
prefix (ft. for a purification, ra. for the retuning attack, qra. for QRA), less the keys that cannot
change a number (NOT_RECIPE) and those the tables already show as heading, column or row (CELL_KEYS).
"""
from __future__ import annotations

import json
from typing import Iterable

#: settings that cannot change a run's numbers, left out of its recipe: the seeds (replicates differ only
#: in them; they are the seed and tune_seed columns), where files live, how progress shows, the device,
#: the evaluation batch size, and the flags that only decide what is kept (log, save) or checked. `amp`
#: stays in: bf16 and fp32 give slightly different numbers (`auto` is recorded as given, so it means
#: bf16 on a GPU and fp32 on a CPU; the device is not part of the recipe).
NOT_RECIPE = frozenset({"random_seed", "device", "progress", "overwrite", "eval_batch_size", "record_root", "dataset_path",
                        "resource_root", "yaml_path", "bd_yaml_path", "download", "log", "save", "pre", "eval_every",
                        "clean_record"})
#: keys the table already shows as its heading, column or row (the record's identity, the mode, the tag),
#: and the record-identity flags a purification or attack on the record repeats or merely checks
CELL_KEYS = frozenset({"dataset", "model", "attack", "pratio", "attack_target"})
RUN_CELL_KEYS = CELL_KEYS | {"attack_label_trans", "ft_mode", "defense_type", "tag"}
#: the prefix of each run's settings in a recipe: the victim's keys are bare
RECIPE_PREFIX = {"purify": "ft.", "retune": "ra.", "qra": "qra."}


def recipe_part(settings: dict, kind: str, drop: Iterable[str] = ()) -> dict:
    """The settings of one run that shape its numbers, keys prefixed by its kind (bare for the victim,
    kind "attack"); `drop` names further keys to leave out."""
    drop = set(drop)
    if kind == "attack":
        return {k: v for k, v in settings.items() if k not in NOT_RECIPE and k not in CELL_KEYS and k not in drop}
    return {RECIPE_PREFIX[kind] + k: v for k, v in settings.items()
            if k not in NOT_RECIPE and k not in RUN_CELL_KEYS and k not in drop}


def recipe_text(recipe: dict) -> str:
    """A recipe as the canonical one-line JSON the CSV holds (sorted keys: equal recipes, equal text)."""
    return json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=str)


def recipe_of(row: dict) -> dict:
    """The recipe of a row as a dict ({} for rows of CSVs written before recipes existed)."""
    text = row.get("recipe") or ""
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {"recipe": text}
    return value if isinstance(value, dict) else {"recipe": text}


def _key_rank(key: str) -> tuple:
    prefix = next((i for i, p in enumerate(RECIPE_PREFIX.values(), 1) if key.startswith(p)), 0)
    return prefix, key


_ABSENT = object()  # a setting a recipe does not have


def _value_text(value) -> str:
    return "?" if value is _ABSENT else json.dumps(value) if isinstance(value, (dict, list)) or value is None else str(value)


def differing_settings(cells: dict) -> dict[str, list[str]]:
    """{setting: its values, as text} of every setting whose value differs between two recipes of one
    cell; `cells` maps any cell key to the recipe texts found in it. A setting one recipe lacks
    (an older record) differs too and reads "?"."""
    out: dict[str, set] = {}
    for recipes in cells.values():
        dicts = [json.loads(r) if r else {} for r in set(recipes)]
        if len(dicts) < 2:
            continue
        for key in set().union(*dicts):
            values = {_value_text(d.get(key, _ABSENT)) for d in dicts}
            if len(values) > 1:
                out.setdefault(key, set()).update(values)
    return {k: sorted(out[k], key=lambda v: (len(v), v)) for k in sorted(out, key=_key_rank)}


def recipe_label(recipe: str, keys) -> str:
    """`epochs=3, train_subset=20000`: the values of `keys` in this recipe ("" when keys is empty)."""
    data = json.loads(recipe) if recipe else {}
    return ", ".join(f"{k}={_value_text(data.get(k, _ABSENT))}" for k in keys)


def differing_note(differ: dict[str, list[str]]) -> str:
    """The line under a table whose cells hold several recipes."""
    if not differ:
        return ""
    listed = "; ".join(f"{k} ({', '.join(v)})" for k, v in differ.items())
    prefixes = [f"{p} = {what}" for p, what in (("ft.", "purification"), ("ra.", "retuning attack"), ("qra.", "QRA"))
                if any(k.startswith(p) for k in differ)]
    return (f"Recipes differ here, so rows are split by them and never averaged across: {listed}"
            + (f" (unprefixed: the victim's config.yaml; {', '.join(prefixes)})" if prefixes else "") + ".")
