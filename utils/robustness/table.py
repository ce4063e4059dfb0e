"""The post-purification robustness table (the NeurIPS 2024 paper's layout): for each attack, C-Acc
and ASR after purification and after the retuning attack, one row per model: the clean model
(pratio-0 record), the unpurified backdoored model, and each purification mode.

    python -m utils.robustness_table record/robustness_fmnist --dataset fmnist --model smallcnn --attacks badnet blended \
        --retune_tags '' p20 --qra

A missing result is shown as "-" (the table of a sweep that is still running is still printed).
Below the table, one line per attack names the retuning set(s) RA used, so that a table mixing the
shared set (every row retuned on the same split, the default) with per-defense subsets shows it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from utils.defenses.purify import ALL_MODES
from utils.record.layout import RESULT_FILE, defense_folder, qra_folder, record_path, retune_folder

#: the rows of the NeurIPS 2024 table: the clean model, the unpurified one, then these modes (titles from the registry)
TABLE_MODES = ("ft", "fst", "ft-sam", "bti", "pam")
ROWS = (("clean", "clean model"), ("none", "no defense"), *((m, ALL_MODES[m].title) for m in TABLE_MODES))


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _results(root: Path, dataset: str, model: str, attack: str, row: str, pratio: float, target: int,
             tag: str = "") -> tuple[dict | None, dict | None, dict | None]:
    """(metrics after purification, the retuning result of `tag`, the QRA result) of one row, None
    where missing."""
    rec = record_path(root, dataset, attack, pratio, target, model)
    if row in ("clean", "none"):
        base = record_path(root, dataset, attack, 0.0, target, model) if row == "clean" else rec
        retuned = _read(retune_folder(base, tag) / RESULT_FILE)
        plain = retuned or _read(retune_folder(base) / RESULT_FILE)
        return (plain["before"] if plain else None), retuned, _read(qra_folder(base) / RESULT_FILE)
    result = _read(defense_folder(rec, row) / RESULT_FILE)
    return ((result["after"] if result else None), _read(retune_folder(defense_folder(rec, row), tag) / RESULT_FILE),
            _read(qra_folder(defense_folder(rec, row)) / RESULT_FILE))


def ra_set(retuned: dict) -> str:
    """How a retuning result chose its clean split, in words (results from before the shared set
    existed always used the purification's own subset)."""
    t = retuned.get("tuning") or {}
    source = t.get("source", "defense")
    what = "shared split" if source == "shared" else "the defense's own split"
    size = retuned.get("tuning_size")
    return (f"{what} {t.get('split_ratio')} seed {t.get('random_seed')}" + (f" ({size} images)" if size else "")
            + f", {retuned.get('poison_num')} poisoned")


def cells(root: Path, dataset: str, model: str, attack: str, row: str, pratio: float = 0.1, target: int = 0,
          tags: Sequence[str] = ("",), qra: bool = False) -> list:
    """[C-Acc, ASR after purification, then C-Acc and ASR after RA for each retuning tag, then (qra)
    the ASR of poisoned inputs + the QRA perturbation on this model and on the clean model], in
    percent, None where missing."""
    out: list = []
    for i, tag in enumerate(tags):
        purified, retuned, qra_result = _results(root, dataset, model, attack, row, pratio, target, tag)
        if i == 0:
            out += [100 * purified["clean_acc"], 100 * purified["asr"]] if purified else [None, None]
        after = retuned["after"] if retuned else None
        out += [100 * after["clean_acc"], 100 * after["asr"]] if after else [None, None]
    if qra:
        after = (qra_result or {}).get("after")
        out += [100 * after["purified"]["asr"], 100 * after["clean"]["asr"]] if after else [None, None]
    return out


def _poison_label(root: Path, dataset: str, model: str, attack: str, pratio: float, target: int, tag: str) -> str:
    """'RA n' with the poisoned-sample count of the first result found for this tag, else the tag."""
    for key, _ in ROWS:
        retuned = _results(root, dataset, model, attack, key, pratio, target, tag)[1]
        if retuned and retuned.get("poison_num") is not None:
            return f"RA {retuned['poison_num']}"
    return f"RA {tag or 'default'}"


def markdown(root: Path, dataset: str, model: str, attacks: Sequence[str], pratio: float = 0.1, target: int = 0,
             tags: Sequence[str] = ("",), qra: bool = False) -> str:
    """One table per attack: rows are the models, columns C-Acc and ASR after purification (O-),
    after each retuning attack (P-), and optionally the QRA ASRs; then the retuning-set notes."""
    root = Path(root)
    lines: list[str] = []
    for attack in attacks:
        head = ["model", "C-Acc", "O-ASR"]
        for tag in tags:
            label = _poison_label(root, dataset, model, attack, pratio, target, tag)
            head += [f"C-Acc after {label}", f"P-ASR ({label})"]
        if qra:
            head += ["QRA ASR", "QRA ASR on clean model"]
        if lines:
            lines.append("")
        lines += [f"**{attack}** ({dataset}/{model}, pratio {pratio})", "", "| " + " | ".join(head) + " |",
                  "|---" + "|---:" * (len(head) - 1) + "|"]
        for key, label in ROWS:
            values = cells(root, dataset, model, attack, key, pratio, target, tags, qra)
            lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in values) + " |")
    notes = []
    for attack in attacks:
        for tag in tags:
            used: dict[str, list[str]] = {}
            for key, label in ROWS:
                retuned = _results(root, dataset, model, attack, key, pratio, target, tag)[1]
                if retuned:
                    used.setdefault(ra_set(retuned), []).append(label)
            if len(used) == 1:
                notes.append(f"RA set ({attack}): {next(iter(used))}, every row")
            elif used:
                notes.append(f"RA sets ({attack}) differ: "
                             + "; ".join(f"{', '.join(rows)}: {text}" for text, rows in used.items()))
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(description="Print the post-purification robustness table of a record root.")
    p.add_argument("record_root")
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--attacks", nargs="+", default=["badnet", "blended"])
    p.add_argument("--pratio", type=float, default=0.1)
    p.add_argument("--attack_target", type=int, default=0)
    p.add_argument("--retune_tags", nargs="+", default=[""],
                   help="retuning results to show, by tag ('' = retune/, p20 = retune_p20/); default ''")
    p.add_argument("--qra", action="store_true", help="add the QRA columns (ASR of poisoned inputs + delta)")
    args = p.parse_args(argv)
    table = markdown(Path(args.record_root), args.dataset, args.model, args.attacks, args.pratio, args.attack_target,
                     args.retune_tags, args.qra)
    print(table)
    return table


if __name__ == "__main__":
    main()
