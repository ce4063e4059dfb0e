"""The post-purification robustness table (the NeurIPS 2024 paper's layout): for each attack, C-Acc
and ASR after purification and after the retuning attack, one row per model: the clean model
(pratio-0 record), the unpurified backdoored model, and each purification mode.

    python -m utils.robustness_table record/robustness_fmnist --dataset fmnist --model smallcnn --attacks badnet blended

A missing result is shown as "-" (the table of a sweep that is still running is still printed).
Below the table, one line per attack names the retuning set(s) RA used, so that a table mixing the
shared set (every row retuned on the same split, the default) with per-defense subsets shows it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from utils.record import record_path

ROWS = (("clean", "clean model"), ("none", "no defense"), ("ft", "FT"), ("fst", "FST"), ("ft-sam", "FT-SAM"),
        ("bti", "BTI"), ("pam", "PAM"))


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _results(root: Path, dataset: str, model: str, attack: str, row: str, pratio: float, target: int):
    """(metrics after purification, the retuning result) of one row, None where missing."""
    rec = record_path(root, dataset, attack, pratio, target, model)
    if row == "clean":
        retuned = _read(record_path(root, dataset, attack, 0.0, target, model) / "retune" / "result.json")
        return (retuned["before"] if retuned else None), retuned
    if row == "none":
        retuned = _read(rec / "retune" / "result.json")
        return (retuned["before"] if retuned else None), retuned
    result = _read(rec / "defense" / row / "result.json")
    return (result["after"] if result else None), _read(rec / "defense" / row / "retune" / "result.json")


def ra_set(retuned: dict) -> str:
    """How a retuning result chose its clean split, in words (results from before the shared set
    existed always used the purification's own subset)."""
    t = retuned.get("tuning") or {}
    source = t.get("source", "defense")
    what = "shared split" if source == "shared" else "the defense's own split"
    size = retuned.get("tuning_size")
    return (f"{what} {t.get('split_ratio')} seed {t.get('random_seed')}" + (f" ({size} images)" if size else "")
            + f", {retuned.get('poison_num')} poisoned")


def cells(root: Path, dataset: str, model: str, attack: str, row: str, pratio: float = 0.1, target: int = 0) -> list:
    """[C-Acc, ASR after purification, C-Acc, ASR after RA] in percent (None where missing)."""
    purified, retuned = _results(root, dataset, model, attack, row, pratio, target)
    out = []
    for metrics in (purified, retuned["after"] if retuned else None):
        out += [100 * metrics["clean_acc"], 100 * metrics["asr"]] if metrics else [None, None]
    return out


def markdown(root: Path, dataset: str, model: str, attacks: Sequence[str], pratio: float = 0.1, target: int = 0) -> str:
    head = "| model | " + " | ".join(f"{a} C-Acc | {a} ASR | {a} C-Acc after RA | {a} ASR after RA" for a in attacks) + " |"
    lines = [head, "|---" * (1 + 4 * len(attacks)) + "|"]
    for key, label in ROWS:
        values = []
        for attack in attacks:
            values += cells(Path(root), dataset, model, attack, key, pratio, target)
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in values) + " |")
    notes = []
    for attack in attacks:
        used: dict[str, list[str]] = {}
        for key, label in ROWS:
            retuned = _results(Path(root), dataset, model, attack, key, pratio, target)[1]
            if retuned:
                used.setdefault(ra_set(retuned), []).append(label)
        if len(used) == 1:
            notes.append(f"RA set ({attack}): {next(iter(used))}, every row")
        elif used:
            notes.append(f"RA sets ({attack}) differ: " + "; ".join(f"{', '.join(rows)}: {text}" for text, rows in used.items()))
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(description="Print the post-purification robustness table of a record root.")
    p.add_argument("record_root")
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--attacks", nargs="+", default=["badnet", "blended"])
    p.add_argument("--pratio", type=float, default=0.1)
    p.add_argument("--attack_target", type=int, default=0)
    args = p.parse_args(argv)
    table = markdown(Path(args.record_root), args.dataset, args.model, args.attacks, args.pratio, args.attack_target)
    print(table)
    return table


if __name__ == "__main__":
    main()
