"""Collect every result under a record root into one long CSV and paper-style markdown tables.

    python -m utils.results record/repro_fmnist --dataset fmnist --pratio 0.1 --csv all.csv --markdown tables.md

Rows follow the long-CSV contract (kinds attack, purify, retune, qra; one row per result file), so that
utils/analysis/plots.py can read what this writes. Replicates are runs that differ only in their seeds:
every row carries its recipe (the `recipe` column: the victim's config.yaml and the config.yaml of each
run on top of it, less the keys that cannot change a number, see NOT_RECIPE), summaries group by it,
and a table with several recipes in one cell shows one row per recipe, named by the settings that
differ, with a line under the table listing them. A record folder is any folder (at any depth, names starting
with "." never read) holding `config.yaml` with an `attack` key and `summary.json`. A file that cannot
be used becomes one warning ("path: reason"), never an exception: a sweep that is still running, or
one that crashed half-way, still gives its table.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.config import ArgumentParser, read_yaml
from utils.errors import UserError, run_cli
from utils.attacks.registry import ATTACKS
from utils.defenses.purify import ALL_MODES, MODES
from utils.record.layout import CONFIG_FILE, DEFENSE_DIR, RESULT_FILE, SUMMARY_FILE, format_pratio, is_qra_folder, is_retune_folder
from utils.record.recipe import differing_note, differing_settings, recipe_label, recipe_of, recipe_part, recipe_text
from utils.record.store import write_text

COLUMNS = ("kind", "dataset", "model", "attack", "pratio", "target", "seed", "mode", "tag", "tune_seed", "clean_acc", "asr",
           "ra", "before_clean_acc", "before_asr", "before_ra", "der", "epochs", "seconds", "record", "path", "recipe", "env")
KINDS = ("attack", "purify", "retune", "qra")
METRICS = ("clean_acc", "asr", "ra")
GROUP_KEYS = ("kind", "dataset", "model", "attack", "pratio", "target", "mode", "tag", "recipe")
STR_COLUMNS = {"kind", "dataset", "model", "attack", "mode", "tag", "record", "path", "recipe", "env"}
INT_COLUMNS = {"target", "seed", "tune_seed", "epochs", "n"}
PRATIO_TOL = 1e-9
NONE = "none"
MODE_NAMES = {NONE: "No defense", **{name: mode.title for name, mode in ALL_MODES.items()}}


_MODE_ONLY = {opt.name for mode in ALL_MODES.values() for opt in mode.options}  # settings only some modes read


class _Unusable(Exception):
    """A result file that cannot be used; the message says why."""


# --- reading one file -------------------------------------------------------------------------

def _load(path: Path, kind: str = "json") -> dict:
    try:
        if kind == "json":
            data = json.loads(path.read_text())
        else:  # bounded, no aliases: a hostile config.yaml cannot expand in memory
            data = read_yaml(path)
    except UserError as err:
        raise _Unusable(str(err)) from None
    except OSError as err:
        raise _Unusable(f"unreadable ({err.strerror or err})") from None
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise _Unusable(f"not valid {kind.upper()}, truncated? ({first})") from None
    if not isinstance(data, dict):
        raise _Unusable(f"not a {kind.upper()} mapping")
    return data


def _get(data: dict, *keys: str, optional: bool = False):
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            if optional:
                return None
            raise _Unusable(f"missing key {'.'.join(keys)}")
        data = data[key]
    return data


def _num(data: dict, *keys: str, cast=float, optional: bool = False):
    value = _get(data, *keys, optional=optional)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Unusable(f"{'.'.join(keys)} is not a number ({value!r})")
    return cast(value)


def _text(data: dict, key: str) -> str:
    value = _get(data, key)
    if not isinstance(value, str) or not value:
        raise _Unusable(f"{key} is not a name ({value!r})")
    return value


def _tag(folder_name: str, prefix: str) -> str:
    """The tag of `<prefix>` (""), `<prefix>_<tag>` (tag); anything else is inconsistent."""
    if folder_name == prefix:
        return ""
    if folder_name.startswith(prefix + "_"):
        return folder_name[len(prefix) + 1:]
    raise _Unusable(f"folder name {folder_name!r} does not match {prefix!r}")


def _metrics(data: dict, *keys: str, prefix: str = "") -> dict:
    return {prefix + m: _num(data, *keys, m) for m in METRICS}


def _parse(kind: str, data: dict, folder_name: str) -> dict:
    """The kind-specific columns of one file (schema: see the module's CSV contract)."""
    empty_before = {f"before_{m}": None for m in METRICS}
    if kind == "attack":
        return dict(mode=NONE, tag="", tune_seed=None, **_metrics(data), **empty_before, der=None,
                    epochs=_num(data, "epochs", cast=int, optional=True), seconds=_num(data, "seconds", optional=True))
    if kind == "purify":
        mode = _text(data, "ft_mode")
        return dict(mode=mode, tag=_tag(folder_name, mode), tune_seed=_num(data, "args", "random_seed", cast=int, optional=True),
                    **_metrics(data, "after"), **_metrics(data, "before", prefix="before_"),
                    der=_num(data, "der", optional=True), epochs=_num(data, "args", "epochs", cast=int, optional=True),
                    seconds=_num(data, "seconds", optional=True))
    stage, seed_keys = ((), ("seed",)) if kind == "retune" else (("purified",), ("settings", "seed"))
    return dict(mode=_text(data, "defense_type"), tag=_tag(folder_name, kind), tune_seed=_num(data, *seed_keys, cast=int, optional=True),
                **_metrics(data, "after", *stage), **_metrics(data, "before", *stage, prefix="before_"), der=None,
                epochs=_num(data, "args", "epochs", cast=int, optional=True), seconds=_num(data, "seconds", optional=True))


def _recipe_part(settings: dict, kind: str, mode: str = "") -> dict:
    """recipe_part, and a purification also leaves out the settings only other modes read (sam_rho is
    no FST setting)."""
    if kind != "purify":
        return recipe_part(settings, kind)
    own = {opt.name for opt in ALL_MODES[mode].options} if mode in ALL_MODES else _MODE_ONLY
    return recipe_part(settings, kind, _MODE_ONLY - own)


def _record_meta(config: dict) -> dict:
    return {"dataset": _text(config, "dataset"), "model": _text(config, "model"), "attack": _text(config, "attack"),
            "pratio": _num(config, "pratio"), "target": _num(config, "attack_target", cast=int),
            "seed": _num(config, "random_seed", cast=int)}


# --- collecting ---------------------------------------------------------------------------------

def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _result_files(record: Path) -> list[tuple[str, Path]]:
    """(kind, file) of every result that may exist below a record folder (missing ones included)."""
    files = [("attack", record / SUMMARY_FILE)]
    for sub in _subfolders(record):
        if is_retune_folder(sub.name):
            files.append(("retune", sub / RESULT_FILE))
        elif sub.name == DEFENSE_DIR:
            for defense in _subfolders(sub):
                files.append(("purify", defense / RESULT_FILE))
                for attack in _subfolders(defense):
                    if is_retune_folder(attack.name):
                        files.append(("retune", attack / RESULT_FILE))
                    elif is_qra_folder(attack.name):
                        files.append(("qra", attack / RESULT_FILE))
    return [(kind, path) for kind, path in files if path.is_file()]


def _env(data: dict) -> str:
    """Where a result was computed, as far as it says: `cpu` or the GPU's name, and the torch version
    ("" when it says neither). Not part of the recipe, but a cell mixing two is flagged."""
    device = data.get("device") if isinstance(data.get("device"), str) else ""
    if "(" in device and not device.startswith("cpu"):
        device = device.split("(", 1)[1].rstrip(")")  # cuda:0 (NVIDIA H200) -> NVIDIA H200
    else:
        device = device.split(" ", 1)[0]
    versions = data.get("versions") if isinstance(data.get("versions"), dict) else {}
    torch_version = versions.get("torch") if isinstance(versions.get("torch"), str) else ""
    return ", ".join(part for part in (device, f"torch {torch_version}" if torch_version else "") if part)


def _run_settings(folder: Path, result: dict | None = None) -> dict:
    """A run's resolved settings: its config.yaml, else the `args` its result.json repeats, else {}
    (results from before either was written)."""
    try:
        return _load(folder / CONFIG_FILE, "yaml")
    except _Unusable:
        pass
    if result is None:
        try:
            result = _load(folder / RESULT_FILE)
        except _Unusable:
            return {}
    args = result.get("args")
    return args if isinstance(args, dict) else {}


def _recipe(kind: str, mode: str, path: Path, data: dict, victim: dict, record: Path) -> dict:
    """What shaped one result: the victim's settings, and for a purified model the purification's,
    and for an attack on a model (retune, qra) the attack's own."""
    if kind == "attack":
        return dict(victim)
    if kind == "purify":
        return {**victim, **_recipe_part(_run_settings(path.parent, data), "purify", mode)}
    recipe = dict(victim)
    model_folder = path.parent.parent
    if model_folder != record:  # an attack on a purified model: defense/<mode>/<retune|qra>/
        settings = _run_settings(model_folder)
        recipe.update(_recipe_part(settings, "purify", str(settings.get("ft_mode") or mode)))
    recipe.update(_recipe_part(_run_settings(path.parent, data), kind))
    return recipe


def _sort_key(row: dict) -> tuple:
    return (row["dataset"], row["model"], row["pratio"], row["target"], row["attack"], KINDS.index(row["kind"]),
            _mode_rank(row["mode"]), row["tag"], row["seed"], -1 if row["tune_seed"] is None else row["tune_seed"], row["path"])


def collect(root: str | Path) -> tuple[list[dict], list[str]]:
    """Every result under `root` as rows of the long-CSV schema (sorted by dataset, model, pratio,
    target, attack, kind, mode, tag, seeds), and one warning per file that could not be used."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"record root {root} {'is not a folder' if root.exists() else 'does not exist'}")
    rows, warnings = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if CONFIG_FILE not in filenames:
            continue
        folder = Path(dirpath)
        try:
            config = _load(folder / CONFIG_FILE, "yaml")
        except _Unusable as err:
            warnings.append(f"{folder / CONFIG_FILE}: {err}")
            dirnames[:] = []
            continue
        if "attack" not in config:
            continue  # not an attack record
        dirnames[:] = []  # a record: its results are read below, and no record lies inside another
        if SUMMARY_FILE not in filenames:
            warnings.append(f"{folder}: config.yaml but no summary.json (attack still running, or it failed)")
            continue
        try:
            meta = _record_meta(config)
        except _Unusable as err:
            warnings.append(f"{folder / CONFIG_FILE}: {err}")
            continue
        victim = _recipe_part(config, "attack")
        for kind, path in _result_files(folder):
            try:
                data = _load(path)
                row = {"kind": kind, **meta, **_parse(kind, data, path.parent.name)}
            except _Unusable as err:
                warnings.append(f"{path}: {err}")
                continue
            row["recipe"] = recipe_text(_recipe(kind, row["mode"], path, data, victim, folder))
            row["env"] = _env(data)
            row.update(record=folder.relative_to(root).as_posix(), path=path.relative_to(root).as_posix())
            rows.append({c: row[c] for c in COLUMNS})
    return sorted(rows, key=_sort_key), warnings


# --- CSV ----------------------------------------------------------------------------------------

def _csv_text(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else repr(row[c]) if isinstance(row[c], float) else row[c] for c in columns])
    return buf.getvalue()


def write_long_csv(rows: Sequence[dict], path: str | Path) -> None:
    """The rows in the schema's column order, atomically; floats at full precision, None as ""."""
    write_text(Path(path), _csv_text(rows, COLUMNS))


def write_summary_csv(summary: Sequence[dict], path: str | Path) -> None:
    write_text(Path(path), _csv_text(summary, list(summary[0]) if summary else GROUP_KEYS))


def read_long_csv(path: str | Path) -> list[dict]:
    """Rows as written by write_long_csv (or a summary CSV): numbers back as int/float, empty as None."""
    def value(col: str, text: str):
        if col in STR_COLUMNS:
            return text
        if text == "":
            return None
        return int(float(text)) if col in INT_COLUMNS else float(text)
    with open(path, newline="") as fh:
        return [{c: value(c, t) for c, t in row.items()} for row in csv.DictReader(fh)]


# --- summaries and filters ----------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(rows: Sequence[dict]) -> list[dict]:
    """One entry per (kind, dataset, model, attack, pratio, target, mode, tag, recipe): n (replicates = rows),
    env (the distinct devices / torch versions of its rows, "; "-separated)
    and <metric>_mean, <metric>_std (sample std, 0 for n=1) of clean_acc, asr, ra and der (der over the
    rows that have one; None where none has). Order: the groups' first appearance in `rows`."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(round(row[k], 9) if k == "pratio" else row[k] for k in GROUP_KEYS)].append(row)
    out = []
    for members in groups.values():
        entry = {k: members[0][k] for k in GROUP_KEYS}
        entry["n"] = len(members)
        entry["env"] = "; ".join(sorted({r.get("env") or "" for r in members} - {""}))
        for m in (*METRICS, "der"):
            entry[f"{m}_mean"], entry[f"{m}_std"] = _mean_std([r[m] for r in members if r.get(m) is not None])
        out.append(entry)
    return out


def repeated_replicates(rows: Sequence[dict]) -> list[str]:
    """One line per set of rows that share their group and (seed, tune_seed), e.g. the same record under
    two sweep roots: summarize counts them as separate replicates, which the user should know."""
    seen: dict[tuple, list[str]] = defaultdict(list)
    for row in rows:
        seen[tuple(round(row[k], 9) if k == "pratio" else row[k] for k in (*GROUP_KEYS, "seed", "tune_seed"))].append(row["path"])
    return [f"{paths[0]}: {len(paths) - 1} more result(s) with the same settings and seeds ({', '.join(paths[1:3])}"
            f"{', ...' if len(paths) > 3 else ''}); averaged as separate replicates" for paths in seen.values() if len(paths) > 1]


def filter_rows(rows: Sequence[dict], datasets=None, models=None, pratios=None, attacks=None, modes=None, tags=("",),
                kinds=None) -> list[dict]:
    """The rows matching every given filter (None = any). pratio matches within 1e-9. Rows of mode
    "none" (the unpurified baseline of every table) pass any `modes` filter, and kind=attack rows
    (which have no tag) pass any `tags` filter."""
    def keep(row: dict) -> bool:
        return ((datasets is None or row["dataset"] in datasets) and (models is None or row["model"] in models)
                and (attacks is None or row["attack"] in attacks) and (kinds is None or row["kind"] in kinds)
                and (pratios is None or any(abs(row["pratio"] - p) <= PRATIO_TOL for p in pratios))
                and (modes is None or row["mode"] == NONE or row["mode"] in modes)
                and (tags is None or row["kind"] == "attack" or row["tag"] in tags))
    return [row for row in rows if keep(row)]


# --- markdown tables ----------------------------------------------------------------------------

def _mode_rank(mode: str) -> tuple:
    order = list(MODES)
    return (0, 0, "") if mode == NONE else (1, order.index(mode), "") if mode in order else (2, 0, mode)


def mode_name(mode: str, tag: str = "") -> str:
    name = MODE_NAMES.get(mode, mode.upper())
    return f"{name} [{tag}]" if tag else name


def attack_name(attack: str) -> str:
    return ATTACKS[attack].title if attack in ATTACKS and ATTACKS[attack].title else attack


def _cell(entry: dict | None, metric: str, max_n: int, bold: bool = False) -> str:
    if entry is None or entry[f"{metric}_mean"] is None:
        return "–"
    text = f"{100 * entry[metric + '_mean']:.2f} ± {100 * entry[metric + '_std']:.2f}"
    text = f"**{text}**" if bold else text
    return text + (f" (n={entry['n']})" if entry["n"] < max_n else "")


def _tables(rows: Sequence[dict], kinds: Sequence[str], metrics: Sequence[tuple[str, str]], attacks, title: str,
            bold_asr: bool) -> str:
    """One markdown table per (dataset, model, pratio, target): rows = (mode, tag) in the paper's
    order, columns = attack x metrics. Where a (mode, tag, attack) cell holds results of several
    recipes, every row is split by the settings that differ (named after the defense, e.g. `FT
    (epochs=3, train_subset=20000)`) and a line under the table lists them; a cell never averages
    results of two recipes."""
    chosen = [r for r in rows if r["kind"] in kinds]
    tables = defaultdict(list)
    for row in chosen:
        tables[(row["dataset"], row["model"], round(row["pratio"], 9), row["target"])].append(row)
    out = []
    for (dataset, model, pratio, target), members in sorted(tables.items()):
        present = {r["attack"] for r in members}
        columns = [a for a in attacks if a in present] if attacks else sorted(present)
        summary = summarize(members)
        recipes = defaultdict(set)
        for e in summary:
            recipes[(e["mode"], e["tag"], e["attack"])].add(e["recipe"])
        differ = differing_settings(recipes)
        cells = {(e["mode"], e["tag"], recipe_label(e["recipe"], differ), e["attack"]): e for e in summary}
        lines = sorted({(m, t, v) for m, t, v, _ in cells}, key=lambda mtv: (_mode_rank(mtv[0]), mtv[1], mtv[2]))
        max_n = max(e["n"] for e in cells.values())
        seeds = len({r["seed"] for r in members})
        head = f"### {dataset} / {model} / pratio {format_pratio(pratio)}" + (f" / target {target}" if target else "")
        header = ["Defense"] + [f"{attack_name(a)} {label}" for a in columns for _, label in metrics]
        text = [f"{head}{title} ({seeds} seed{'s' if seeds != 1 else ''})", "", "| " + " | ".join(header) + " |",
                "|---" + "|---:" * (len(header) - 1) + "|"]
        best = {}
        for a in columns:
            asrs = [cells[(m, t, v, a)]["asr_mean"] for m, t, v in lines if m != NONE and (m, t, v, a) in cells]
            best[a] = min(asrs) if bold_asr and asrs else None
        for mode, tag, variant in lines:
            values = [mode_name(mode, tag) + (f" ({variant})" if variant else "")]
            for a in columns:
                entry = cells.get((mode, tag, variant, a))
                for metric, _ in metrics:
                    if metric == "der" and mode == NONE:
                        values.append("")
                        continue
                    bold = (metric == "asr" and mode != NONE and entry is not None and best[a] is not None
                            and entry["asr_mean"] is not None and abs(entry["asr_mean"] - best[a]) < 1e-12)
                    values.append(_cell(entry, metric, max_n, bold))
            text.append("| " + " | ".join(values) + " |")
        if differ:
            text += ["", differing_note(differ)]
        mixed = [f"{mode_name(m, t)}{f' ({v})' if v else ''} / {attack_name(a)} ({e['env']})"
                 for (m, t, v, a), e in sorted(cells.items(), key=lambda kv: (_mode_rank(kv[0][0]), kv[0][1:]))
                 if ";" in (e.get("env") or "")]
        if mixed:
            text += ["", "Replicates computed on different hardware or torch versions (not part of the recipe): "
                     + "; ".join(mixed) + "."]
        out.append("\n".join(text))
    return "\n\n".join(out)


def purification_tables(rows: Sequence[dict], attacks: Sequence[str] | None = None, bold_best: bool = True) -> str:
    """FST-paper layout: "No defense" (kind=attack rows) then the purification modes; per attack
    C-Acc, ASR, RA, DER as `mean ± std` in percent; the lowest defended ASR of each attack in bold."""
    metrics = (("clean_acc", "C-Acc"), ("asr", "ASR"), ("ra", "RA"), ("der", "DER"))
    return _tables(rows, ("attack", "purify"), metrics, attacks, "", bold_best)


def robustness_tables(rows: Sequence[dict], attacks: Sequence[str] | None = None) -> str:
    """After the retuning attack (kind=retune rows): one row per defence type, C-Acc and ASR per attack."""
    metrics = (("clean_acc", "C-Acc after RA"), ("asr", "ASR after RA"))
    return _tables(rows, ("retune",), metrics, attacks, " / retuning attack", False)


# --- the NeurIPS 2024 layout -------------------------------------------------------------------

#: the row kinds of the 2024 table, in their order within a defense: O- after purification (or, for the
#: unpurified model, as trained), P- after the retuning attack
STAGES_2024 = ("O-Backdoor", "P-Backdoor", "O-Robustness", "P-Robustness")


def defense_of(row: dict) -> tuple[str, str]:
    """(mode, tag) of the model a row measures: a purification's own; for an attack on a model (retune,
    qra) its defense folder name `<mode>[_<tag>]` split at the first "_" (mode names hold none); the
    unpurified model is ("none", "")."""
    if row["kind"] in ("attack", "purify"):
        return (NONE, "") if row["kind"] == "attack" else (row["mode"], row["tag"])
    mode, _, tag = row["mode"].partition("_")
    return mode, tag


def select_2024(rows: Sequence[dict], modes: Sequence[str] | None = None, tag: str = "", retune_tag: str = "") -> list[dict]:
    """The rows of the 2024 table: the unpurified models (kind attack), the purifications of defense tag
    `tag` ("*": every tag) and the retuning attacks of RA tag `retune_tag` on those models and on the
    unpurified one; `modes` keeps only these defenses (the unpurified model always stays)."""
    def keep(row: dict) -> bool:
        if row["kind"] not in ("attack", "purify", "retune"):
            return False
        mode, defense_tag = defense_of(row)
        if row["kind"] == "retune" and row["tag"] != retune_tag:
            return False
        if mode == NONE:
            return True
        return (modes is None or mode in modes) and (tag == "*" or defense_tag == tag)
    return [row for row in rows if keep(row)]


def _stage_2024(entry: dict) -> tuple[tuple[str, str], str]:
    """(defense, row kind) of a summary entry in the 2024 table."""
    defense = defense_of(entry)
    if entry["kind"] == "attack":
        return defense, "O-Backdoor"
    if entry["kind"] == "purify":
        return defense, "O-Robustness"
    return defense, "P-Backdoor" if defense[0] == NONE else "P-Robustness"


def tables_2024(rows: Sequence[dict], attacks: Sequence[str] | None = None, retune_tag: str = "") -> str:
    """The NeurIPS 2024 paper's layout, one table per (dataset, model, pratio, target): rows O-Backdoor
    (the unpurified model's C-Acc and ASR), P-Backdoor (the same after RA, where it was run), then per
    defense O-Robustness (after purification) and P-Robustness (after RA on the purified model);
    columns C-Acc and ASR per attack; `mean ± std` in percent over replicates. As in every table here,
    results of different recipes are never averaged: where a cell holds several, each defense's rows
    are split by the settings that differ (ft.* and victim settings pair an O- row with its P- row;
    ra.* settings split only the P- rows), and a line under the table names them."""
    chosen = [r for r in rows if r["kind"] in ("attack", "purify", "retune")]
    tables = defaultdict(list)
    for row in chosen:
        tables[(row["dataset"], row["model"], round(row["pratio"], 9), row["target"])].append(row)
    metrics = (("clean_acc", "C-Acc"), ("asr", "ASR"))
    out = []
    for (dataset, model, pratio, target), members in sorted(tables.items()):
        present = {r["attack"] for r in members}
        columns = [a for a in attacks if a in present] if attacks else sorted(present)
        summary = summarize(members)
        blocks: dict = defaultdict(lambda: defaultdict(set))
        for e in summary:
            defense, stage = _stage_2024(e)
            blocks[defense][(stage, e["attack"])].add(e["recipe"])
        differ_of = {defense: differing_settings(cells) for defense, cells in blocks.items()}
        cells, all_differ = {}, {}
        for e in summary:
            defense, stage = _stage_2024(e)
            differ = differ_of[defense]
            for key, values in differ.items():
                all_differ.setdefault(key, set()).update(values)
            base = recipe_label(e["recipe"], [k for k in differ if not k.startswith("ra.")])
            ra = recipe_label(e["recipe"], [k for k in differ if k.startswith("ra.")]) if stage.startswith("P-") else ""
            cells[(defense, base, stage, ra, e["attack"])] = e
        lines = sorted({k[:4] for k in cells}, key=lambda k: (_mode_rank(k[0][0]), k[0][1], k[1], STAGES_2024.index(k[2]), k[3]))
        max_n = max(e["n"] for e in cells.values())
        seeds = len({r["seed"] for r in members})
        head = f"### {dataset} / {model} / pratio {format_pratio(pratio)}" + (f" / target {target}" if target else "")
        header = ["Defense", "Row"] + [f"{attack_name(a)} {label}" for a in columns for _, label in metrics]
        text = [f"{head} / NeurIPS 2024 layout ({seeds} seed{'s' if seeds != 1 else ''})", "",
                "| " + " | ".join(header) + " |", "|---|---" + "|---:" * (len(header) - 2) + "|"]
        for defense, base, stage, ra in lines:
            name = mode_name(*defense) + (f" ({base})" if base else "")
            values = [name, stage + (f" ({ra})" if ra else "")]
            for a in columns:
                entry = cells.get((defense, base, stage, ra, a))
                values += [_cell(entry, metric, max_n) for metric, _ in metrics]
            text.append("| " + " | ".join(values) + " |")
        text += ["", "O-: the model as trained (O-Backdoor) or after purification (O-Robustness); P-: after the "
                 f"retuning attack (RA{', tag ' + retune_tag if retune_tag else ''}) on it."]
        if all_differ:
            text += ["", differing_note({k: sorted(v, key=lambda x: (len(x), x)) for k, v in all_differ.items()})]
        out.append("\n".join(text))
    return "\n\n".join(out)


def markdown(rows: Sequence[dict], attacks: Sequence[str] | None = None, layout: str = "fst", retune_tag: str = "") -> str:
    """Both sections, each only when it has rows (layout fst); or the 2024 table (layout 2024)."""
    if layout == "2024":
        return "## Purification and post-purification robustness (NeurIPS 2024 layout; percent, mean ± std over " \
               "replicates)\n\n" + tables_2024(rows, attacks, retune_tag) + "\n"
    parts = []
    if any(r["kind"] in ("attack", "purify") for r in rows):
        parts += ["## Purification (percent, mean ± std over replicates)", purification_tables(rows, attacks)]
    if any(r["kind"] == "retune" for r in rows):
        parts += ["## Post-purification robustness: retuning attack (percent)", robustness_tables(rows, attacks)]
    return "\n\n".join(parts) + "\n"


# --- command line -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m utils.results", description="Collect every result under a record root into a CSV and markdown tables "
                                "(printed; written only where asked).")
    a = p.add_argument
    a("root", help="record root, searched recursively (e.g. record/repro_fmnist)")
    a("--dataset", nargs="+", help="only these datasets")
    a("--model", nargs="+", help="only these models")
    a("--pratio", nargs="+", type=float, help="only these poisoning ratios")
    a("--attacks", nargs="+", help="only these attacks, in this column order")
    a("--modes", nargs="+", help="only these purification modes / defence types (the no-defense baseline is always kept)")
    a("--tag", default="", help="only results of this tag (default: untagged; '*' = every tag)")
    a("--csv", help="write the matching rows as the long CSV here (with each row's recipe)")
    a("--summary_csv", help="write the per-group means and stds here (one group per recipe)")
    a("--json", help="write the rows and the per-group summary as JSON here (recipes as objects)")
    a("--markdown", help="write the tables here as well")
    a("--layout", choices=LAYOUTS, default="fst", help="fst: the FST paper's tables (purification, then RA), the default; "
      "2024: the NeurIPS 2024 paper's table (O-Backdoor, then O- and P-Robustness per defense, columns = attacks)")
    a("--retune_tag", help="with --layout 2024: the retuning results shown as P- rows, by tag (default '': retune/)")
    return p


OUTPUT_FLAGS = ("csv", "summary_csv", "json", "markdown")
LAYOUTS = ("fst", "2024")


def check_outputs(args: argparse.Namespace) -> dict[str, Path]:
    """{flag: path} of the files to write, checked before any work: no folder, no file given twice, a
    parent that is (or can become) a writable folder. So a bad path stops the command before one
    output is written and another is not."""
    outputs: dict[str, Path] = {}
    for flag in OUTPUT_FLAGS:
        value = getattr(args, flag)
        if value is None:
            continue
        path = Path(value)
        if value == "" or path.is_dir():
            example = path / f"results.{'md' if flag == 'markdown' else 'json' if flag == 'json' else 'csv'}"
            raise UserError(f"--{flag} {value or repr(value)} is a folder, not a file name (e.g. --{flag} {example})")
        for other, seen in outputs.items():
            if seen.resolve() == path.resolve():
                raise UserError(f"--{flag} and --{other} both name {path}; give each output its own file")
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise UserError(f"--{flag} {path}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"--{flag} {path}: cannot write into {parent} (permission denied)")
        outputs[flag] = path
    return outputs


def _json_rows(rows: Sequence[dict]) -> list[dict]:
    return [{**row, "recipe": recipe_of(row)} for row in rows]


def main(argv: Sequence[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    if args.retune_tag is not None and args.layout != "2024":
        raise UserError("--retune_tag chooses the P- rows of --layout 2024; the fst layout shows retuning results by --tag")
    outputs = check_outputs(args)
    rows, warnings = collect(args.root)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.layout == "2024":
        rows = select_2024(filter_rows(rows, args.dataset, args.model, args.pratio, args.attacks, tags=None), args.modes,
                           args.tag, args.retune_tag or "")
    else:
        rows = filter_rows(rows, args.dataset, args.model, args.pratio, args.attacks, args.modes,
                           None if args.tag == "*" else (args.tag,))
    if not rows:
        flags = " ".join(f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                         for k, v in vars(args).items() if k in ("dataset", "model", "pratio", "attacks", "modes", "tag") and v)
        print(f"error: no results under {args.root} matching {flags or 'the default filter (untagged results)'}", file=sys.stderr)
        raise SystemExit(1)
    for warning in repeated_replicates(rows):
        print(f"warning: {warning}", file=sys.stderr)
    text = markdown(rows, args.attacks, args.layout, args.retune_tag or "")
    print(text, end="")
    summary = summarize(rows)
    contents = {"csv": lambda: _csv_text(rows, COLUMNS),
                "summary_csv": lambda: _csv_text(summary, list(summary[0]) if summary else GROUP_KEYS),
                "json": lambda: json.dumps({"rows": _json_rows(rows), "summary": _json_rows(summary)}, indent=1) + "\n",
                "markdown": lambda: text}
    for flag, path in outputs.items():
        try:
            write_text(path, contents[flag]())
        except OSError as err:
            raise UserError(f"--{flag} {path}: cannot write ({err.strerror or err})") from None
        print(f"wrote {path}", file=sys.stderr)
    return text


if __name__ == "__main__":
    run_cli(main)
