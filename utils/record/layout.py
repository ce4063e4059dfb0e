"""The record layout: every folder and file name inside a record (docs/protocol.md §7). No
other module spells them."""
from __future__ import annotations

from pathlib import Path

from utils.errors import UserError

RECORD_FILE = "attack_result.pt"  # the victim: weights, trigger, poisoned indices, config (weights-only)
FORMAT = "fst-toolkit-record"
FORMAT_VERSION = 1

# files written by every run (victim, purification, retuning, QRA) into its own folder
CONFIG_FILE = "config.yaml"     # the resolved settings
METRICS_FILE = "metrics.csv"    # one row per epoch / evaluation
RESULT_FILE = "result.json"     # the final numbers; its presence marks the run as finished
SUMMARY_FILE = "summary.json"   # the victim's final numbers (beside RECORD_FILE)
MODEL_FILE = "model.pt"         # weights of a purified or retuned model
LOG_FILE = "log.txt"            # the human-readable log
CHECKPOINT_FILE = "checkpoint.pt"  # last finished epoch of an interrupted victim, inside the stage
GENERATOR_FILE = "generator.pt"    # QRA's perturbation generator

# folders
DEFENSE_DIR = "defense"     # <record>/defense/<mode>[_<tag>]/
RETUNE_DIR = "retune"       # <model folder>/retune[_<tag>]/
QRA_DIR = "qra"             # <model folder>/qra[_<tag>]/
LOGS_DIR = "logs"           # <record root>/logs/ (sweeps)
RESOURCES_DIR = "resources"  # <record root>/resources/ (the resource cache)

# beside a result folder NAME while a run writes it: hidden names that no reader takes for a result
def stage_path(final: str | Path, suffix: str = "") -> Path:
    """`.NAME.partial` (an attack's resumable stage) or `.NAME.partial-<suffix>` (a one-shot stage)."""
    final = Path(final)
    return final.parent / (f".{final.name}.partial" + (f"-{suffix}" if suffix else ""))


def one_shot_stages(final: str | Path) -> list[Path]:
    """Every `.NAME.partial-<suffix>` beside the result folder NAME (not the resumable `.NAME.partial`;
    a suffix never holds a dot, so the stages of a result named `NAME.partial-x` are not among them)."""
    final = Path(final)
    prefix = stage_path(final, "-").name[:-1]
    try:
        return [p for p in final.parent.iterdir()
                if p.name.startswith(prefix) and p.name != prefix and "." not in p.name[len(prefix):]]
    except OSError:
        return []


def lock_path(final: str | Path) -> Path:
    """`.NAME.lock`: the file that says which run owns the result folder NAME (utils/record/lock.py)."""
    final = Path(final)
    return final.parent / f".{final.name}.lock"


def old_path(final: str | Path, token: str) -> Path:
    """`.NAME.old-<token>`: a replaced result, for the instant between two renames at commit."""
    final = Path(final)
    return final.parent / f".{final.name}.old-{token}"


#: --defense_type of the unpurified model: the record's own weights (a clean model for pratio 0)
NONE = "none"


def format_pratio(pratio: float) -> str:
    """As Python prints the float: 0.1, 0.01, 0.005, 0.0."""
    return str(float(pratio))


def record_name(pratio: float, target: int, model: str) -> str:
    return f"pratio_{format_pratio(pratio)}-target_{target}-archi_{model}"


def record_path(root: str | Path, dataset: str, attack: str, pratio: float, target: int, model: str) -> Path:
    return Path(root) / dataset / attack / record_name(pratio, target, model)


def existing_records(root: str | Path) -> list[str]:
    """Relative paths of every record folder under `root`."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(str(p.parent.relative_to(root)) for p in root.glob(f"*/*/*/{RECORD_FILE}"))


def find_record(root: str | Path, dataset: str, attack: str, pratio: float, target: int, model: str) -> Path:
    """The record folder for these settings, or a UserError saying what was looked for and what exists."""
    folder = record_path(root, dataset, attack, pratio, target, model)
    if (folder / RECORD_FILE).is_file():
        return folder
    have = existing_records(root)
    listing = ", ".join(have[:20]) + (" ..." if len(have) > 20 else "") if have else "none"
    raise UserError(f"no record at {folder}/{RECORD_FILE} (from --dataset {dataset} --attack {attack} "
                    f"--pratio {pratio} --attack_target {target} --model {model}); records under {root}: {listing}"
                    + _nested_hint(Path(root), folder.relative_to(root)))


def _nested_hint(root: Path, wanted: Path) -> str:
    """Records kept one folder deeper, in a root of their own (the quickstart's record/quickstart/,
    a sweep's seed_<s>/), and the --record_root that reaches them; empty when there are none."""
    if not root.is_dir():
        return ""
    found = sorted(p.parent.relative_to(root) for p in root.glob(f"*/*/*/*/{RECORD_FILE}")
                   if not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not found:
        return ""
    same = [root / p.parts[0] for p in found if Path(*p.parts[1:]) == wanted]
    if same:
        return f"; this record exists under {', '.join(map(str, same))}: add --record_root {same[0]}"
    listing = ", ".join(map(str, found[:20])) + (" ..." if len(found) > 20 else "")
    subs = sorted({str(root / p.parts[0]) for p in found})
    return f"; in sub-folders of {root}: {listing} (use them with --record_root {' or '.join(subs[:3])})"


def tagged(name: str, tag: str) -> str:
    """`name` or `name_tag`: how a tag distinguishes runs of the same kind in one folder."""
    return f"{name}_{tag}" if tag else name


def defense_folder(record_folder: str | Path, mode: str, tag: str = "") -> Path:
    """<record>/defense/<mode>[_<tag>]/: one purification result."""
    return Path(record_folder) / DEFENSE_DIR / tagged(mode, tag)


def source_folder(record_folder: str | Path, defense_type: str) -> Path:
    """The folder of a model under test: the record itself for `none`, else defense/<type>/."""
    if defense_type == NONE:
        return Path(record_folder)
    if not defense_type or "/" in defense_type or defense_type.startswith("."):
        raise UserError(f"--defense_type {defense_type!r} is not a folder name under {DEFENSE_DIR}/")
    return defense_folder(record_folder, defense_type)


def retune_folder(model_folder: str | Path, tag: str = "") -> Path:
    """<model folder>/retune[_<tag>]/: a retuning attack on that model."""
    return Path(model_folder) / tagged(RETUNE_DIR, tag)


def qra_folder(model_folder: str | Path, tag: str = "") -> Path:
    """<model folder>/qra[_<tag>]/: a query-based reactivation attack on that model."""
    return Path(model_folder) / tagged(QRA_DIR, tag)


def is_retune_folder(name: str) -> bool:
    return name == RETUNE_DIR or name.startswith(RETUNE_DIR + "_")


def is_qra_folder(name: str) -> bool:
    return name == QRA_DIR or name.startswith(QRA_DIR + "_")


def available_defenses(record_folder: str | Path) -> list[str]:
    """Every defense/<type>/ of a record that holds saved weights."""
    root = Path(record_folder) / DEFENSE_DIR
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob(f"*/{MODEL_FILE}") if not p.parent.name.startswith("."))


def logs_folder(record_root: str | Path) -> Path:
    return Path(record_root) / LOGS_DIR


def resources_folder(record_root: str | Path) -> Path:
    return Path(record_root) / RESOURCES_DIR
