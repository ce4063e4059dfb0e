"""The post-purification robustness table (the NeurIPS 2024 paper's layout): for each attack, C-Acc
and ASR after purification and after the retuning attack, one row per model: the clean model
(pratio-0 record), the unpurified backdoored model, and each purification mode: the paper's FT, FST,
FT-SAM, BTI and PAM always, every other mode (EP, ANP, NC, ...) that has a result, or `--modes`.

    python -m utils.robustness_table record/robustness_fmnist --dataset fmnist --model smallcnn --attacks badnet blended \
        --retune_tags '' p20 --qra

Each cell is one result file, found by its path (<root>/<dataset>/<attack>/<record>/...): nothing is
averaged, so no two recipes are ever merged. A missing or unreadable result is shown as "-" (the table
of a sweep that is still running is still printed); a root without any of the records asked for is an
error. Below the table, one line per attack names the retuning set(s) RA used, so that a table mixing
the shared set (every row retuned on the same split, the default) with per-defense subsets shows it,
and a line names the settings in which the rows' recipes differ: the clean model's victim against the
backdoored one (e.g. epochs), or the retuning attacks of one tag (e.g. ra.epochs).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence


from utils.config import folder_name, short, tag
from utils.defenses.purify import ALL_MODES
from utils.config import ArgumentParser, read_yaml
from utils.errors import UserError, run_cli
from utils.record.layout import CONFIG_FILE, RESULT_FILE, defense_folder, existing_records, qra_folder, record_path, retune_folder
from utils.record.recipe import differing_settings, recipe_label, recipe_part, recipe_text

#: the rows of the NeurIPS 2024 table: the clean model, the unpurified one, then these modes (titles
#: from the registry), always shown; any other mode with a result under the root joins them
TABLE_MODES = ("ft", "fst", "ft-sam", "bti", "pam")
BASE_ROWS = (("clean", "clean model"), ("none", "no defense"))
ROWS = (*BASE_ROWS, *((m, ALL_MODES[m].title) for m in TABLE_MODES))


def table_rows(root: Path, dataset: str, model: str, attacks: Sequence[str], pratio: float = 0.1, target: int = 0,
               modes: Sequence[str] | None = None) -> tuple:
    """(key, label) of each row: the clean and unpurified models, then `modes`, or by default the
    paper's TABLE_MODES plus every registered mode with a purification result in one of the
    attacks' records (EP, ANP, NC, ... after a sweep of the baselines), in the registry's order."""
    if modes is None:
        records = [record_path(root, dataset, attack, pratio, target, model) for attack in attacks]
        ran = {m for m in ALL_MODES if any((defense_folder(rec, m) / RESULT_FILE).is_file() for rec in records)}
        modes = [m for m in ALL_MODES if m in ran or m in TABLE_MODES]
    return (*BASE_ROWS, *((m, ALL_MODES[m].title) for m in modes))


def _read(path: Path) -> dict | None:
    """A result file's object; None when missing, unreadable or not a JSON object (shown as "-")."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _metrics(data: dict | None, *keys: str) -> dict | None:
    """data[keys...] when it holds numeric clean_acc and asr, else None."""
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), (int, float)) and not isinstance(data.get(k), bool)
                                             for k in ("clean_acc", "asr")):
        return None
    return data


def _results(root: Path, dataset: str, model: str, attack: str, row: str, pratio: float, target: int,
             tag: str = "") -> tuple[dict | None, dict | None, dict | None]:
    """(metrics after purification, the retuning result of `tag`, the QRA result) of one row, None
    where missing."""
    rec = record_path(root, dataset, attack, pratio, target, model)
    if row in ("clean", "none"):
        base = record_path(root, dataset, attack, 0.0, target, model) if row == "clean" else rec
        retuned = _read(retune_folder(base, tag) / RESULT_FILE)
        plain = _metrics(retuned, "before") or _metrics(_read(retune_folder(base) / RESULT_FILE), "before")
        return plain, retuned, _read(qra_folder(base) / RESULT_FILE)
    result = _read(defense_folder(rec, row) / RESULT_FILE)
    return (_metrics(result, "after"), _read(retune_folder(defense_folder(rec, row), tag) / RESULT_FILE),
            _read(qra_folder(defense_folder(rec, row)) / RESULT_FILE))


def ra_set(retuned: dict) -> str:
    """How a retuning result chose its clean split, in words (results from before the shared set
    existed always used the purification's own subset)."""
    t = retuned.get("tuning") if isinstance(retuned.get("tuning"), dict) else {}
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
        after = _metrics(retuned, "after")
        out += [100 * after["clean_acc"], 100 * after["asr"]] if after else [None, None]
    if qra:
        purified, clean = _metrics(qra_result, "after", "purified"), _metrics(qra_result, "after", "clean")
        out += [100 * purified["asr"] if purified else None, 100 * clean["asr"] if clean else None]
    return out


def _poison_label(root: Path, dataset: str, model: str, attack: str, pratio: float, target: int, tag: str,
                  rows: Sequence = ROWS) -> str:
    """'RA n' with the poisoned-sample count of the first result found for this tag, else the tag."""
    for key, _ in rows:
        retuned = _results(root, dataset, model, attack, key, pratio, target, tag)[1]
        if retuned and isinstance(retuned.get("poison_num"), int):
            return f"RA {retuned['poison_num']}"
    return f"RA {tag or 'default'}"


def _victim_recipe(folder: Path) -> str | None:
    """The recipe text of a record's victim (its config.yaml), None without a readable one."""
    try:
        config = read_yaml(folder / CONFIG_FILE)
    except (OSError, UserError):
        return None
    return recipe_text(recipe_part(config, "attack")) if isinstance(config, dict) else None


def recipe_notes(root: Path, dataset: str, model: str, attack: str, pratio: float, target: int,
                 tags: Sequence[str], rows: Sequence = ROWS) -> list[str]:
    """One line per way the rows of an attack's table differ in recipe: the clean model's victim
    against the backdoored one, and the retuning attacks of each tag (their own settings)."""
    notes = []
    victims = {label: _victim_recipe(record_path(root, dataset, attack, p, target, model))
               for label, p in (("clean model", 0.0), ("backdoored", pratio))}
    found = {label: text for label, text in victims.items() if text is not None}
    differ = differing_settings({"victims": set(found.values())})
    if differ:
        notes.append(f"Victims differ ({attack}): " + "; ".join(f"{label}: {recipe_label(text, differ)}"
                                                                 for label, text in found.items()))
    for tag in tags:
        used: dict[str, list[str]] = {}
        for key, label in rows:
            retuned = _results(root, dataset, model, attack, key, pratio, target, tag)[1]
            if retuned and isinstance(retuned.get("args"), dict):
                used.setdefault(recipe_text(recipe_part(retuned["args"], "retune")), []).append(label)
        differ = differing_settings({"retune": set(used)})
        if differ:
            notes.append(f"Retuning settings differ ({attack}{', tag ' + tag if tag else ''}): "
                         + "; ".join(f"{', '.join(rows)}: {recipe_label(text, differ)}" for text, rows in used.items()))
    return notes


def check_root(root: Path, dataset: str, model: str, attacks: Sequence[str], pratio: float, target: int) -> None:
    """A UserError when the root holds none of the record folders the table would read."""
    if not root.is_dir():
        raise UserError(f"record root {root} {'is not a folder' if root.exists() else 'does not exist'}")
    wanted = [record_path(root, dataset, a, p, target, model) for a in attacks for p in (pratio, 0.0)]
    if not any(folder.is_dir() for folder in wanted):
        have = existing_records(root)
        raise UserError(f"no record under {root} for --dataset {dataset} --model {model} --attacks {' '.join(attacks)} "
                        f"--pratio {pratio} --attack_target {target} (looked for {wanted[0]}, ...); records there: "
                        f"{', '.join(have[:10]) + (' ...' if len(have) > 10 else '') if have else 'none'}")


def markdown(root: Path, dataset: str, model: str, attacks: Sequence[str], pratio: float = 0.1, target: int = 0,
             tags: Sequence[str] = ("",), qra: bool = False, modes: Sequence[str] | None = None) -> str:
    """One table per attack: rows are the models (`table_rows`), columns C-Acc and ASR after
    purification (O-), after each retuning attack (P-), and optionally the QRA ASRs; then the
    retuning-set notes and the recipe notes."""
    root = Path(root)
    rows = table_rows(root, dataset, model, attacks, pratio, target, modes)
    lines: list[str] = []
    for attack in attacks:
        head = ["model", "C-Acc", "O-ASR"]
        for tag in tags:
            label = _poison_label(root, dataset, model, attack, pratio, target, tag, rows)
            head += [f"C-Acc after {label}", f"P-ASR ({label})"]
        if qra:
            head += ["QRA ASR", "QRA ASR on clean model"]
        if lines:
            lines.append("")
        lines += [f"**{attack}** ({dataset}/{model}, pratio {pratio})", "", "| " + " | ".join(head) + " |",
                  "|---" + "|---:" * (len(head) - 1) + "|"]
        for key, label in rows:
            values = cells(root, dataset, model, attack, key, pratio, target, tags, qra)
            lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in values) + " |")
    notes = []
    for attack in attacks:
        for tag in tags:
            used: dict[str, list[str]] = {}
            for key, label in rows:
                retuned = _results(root, dataset, model, attack, key, pratio, target, tag)[1]
                if retuned:
                    used.setdefault(ra_set(retuned), []).append(label)
            if len(used) == 1:
                notes.append(f"RA set ({attack}): {next(iter(used))}, every row")
            elif used:
                notes.append(f"RA sets ({attack}) differ: "
                             + "; ".join(f"{', '.join(rows)}: {text}" for text, rows in used.items()))
        notes += recipe_notes(root, dataset, model, attack, pratio, target, tags, rows)
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv: Sequence[str] | None = None) -> str:
    """Print the table (stdout only: redirect it to keep it, e.g. > <record_root>/robustness.md)."""
    p = ArgumentParser(prog="python -m utils.robustness_table", description="Print the post-purification robustness table of a record root.")
    p.add_argument("record_root")
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--attacks", nargs="+", default=["badnet", "blended"])
    p.add_argument("--pratio", type=float, default=0.1)
    p.add_argument("--attack_target", type=int, default=0)
    p.add_argument("--retune_tags", nargs="+", default=[""],
                   help="retuning results to show, by tag ('' = retune/, p20 = retune_p20/); default ''")
    p.add_argument("--qra", action="store_true", help="add the QRA columns (ASR of poisoned inputs + delta)")
    p.add_argument("--modes", nargs="+", help="the purification rows, in this order (default: ft fst ft-sam bti pam and "
                   "every other mode with a result)")
    args = p.parse_args(argv)
    modes = None
    if args.modes is not None:
        modes = [m for part in args.modes for m in part.replace(",", " ").split()]
        unknown = [m for m in modes if m not in ALL_MODES]
        if unknown or not modes:
            raise UserError(f"--modes {short(' '.join(unknown) or '')}: not a purification mode; one of {', '.join(ALL_MODES)}")
    # names become parts of the paths read: plain folder names only, never `..` or a path
    for flag, values, check in (("--dataset", [args.dataset], folder_name), ("--model", [args.model], folder_name),
                                ("--attacks", args.attacks, folder_name), ("--retune_tags", args.retune_tags, tag)):
        for value in values:
            if check(value):
                raise UserError(f"{flag} {short(value)} {check(value)}")
    root = Path(args.record_root)
    check_root(root, args.dataset, args.model, args.attacks, args.pratio, args.attack_target)
    table = markdown(root, args.dataset, args.model, args.attacks, args.pratio, args.attack_target,
                     args.retune_tags, args.qra, modes)
    print(table)
    return table


if __name__ == "__main__":
    run_cli(main)
