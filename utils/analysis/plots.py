"""PNG figures of results: metrics against the poisoning ratio (from a record root or the long results
CSV), training curves of a record and its purifications (from their metrics.csv files), the FST
paper's feature-shift picture (t-SNE of penultimate features before and after purification), and the
NeurIPS 2024 paper's O-ASR / P-ASR picture (ASR after purification against ASR after the retuning attack).

    python -m utils.plots pratio RECORD_ROOT [--out DIR] [--dataset ..] [--model ..] [--attacks ..] [--modes ..]
    python -m utils.plots pratio --csv results.csv [--out DIR] [...]
    python -m utils.plots curves RECORD_FOLDER [--out FILE.png] [--modes ..] [--tag ..]
    python -m utils.plots opasr RECORD_ROOT [--out DIR] [--retune_tag TAG] [--dataset ..] [--model ..] [--attacks ..]
    python -m utils.plots tsne RECORD_FOLDER [--out FILE.png] [--modes ft fst] [--n 500] [--seed 0]
                                             [--dataset_path data] [--device auto]

Without --out the figures go beside their data, never into the working folder: `<RECORD_ROOT>/figures/`
(pratio and opasr from a root), `figures/` beside the CSV (pratio --csv), `<RECORD_FOLDER>/figures/` (curves,
tsne). Every command prints the files it wrote. Empty or malformed input (a metrics.csv without rows or
without the needed columns, a result.json that is not an object, a root without results) is one
`error:` line and no figure.

matplotlib is optional: it is imported only when a figure is drawn (Agg backend, no display needed).
Every PNG is written atomically (a temporary file in the same folder, then os.replace).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from utils import engine
from utils.config import ArgumentParser, read_yaml
from utils.errors import UserError, run_cli
from utils.defenses.purify import MODES
from utils.analysis import results
from utils.analysis.results import MODE_NAMES
from utils.record.layout import CONFIG_FILE, DEFENSE_DIR, METRICS_FILE, MODEL_FILE, NONE, RECORD_FILE, RESULT_FILE, SUMMARY_FILE, defense_folder
from utils.commands.driver import build_loaded_model, load_source_state
from utils.analysis.tsne import knn_separation, knn_vote, tsne
from utils.record.store import load_record, write_bytes, write_json
from utils.config import ArgumentParser, folder_name, parse_progress, short, tag
from utils.victim.experiment import rebuild_experiment

DPI = 120
MODE_ORDER = tuple(MODES)  # the paper's order: ft, lp, fe-tuning, ft-init, fst
NO_DEFENSE = MODE_NAMES["none"]
METRICS = (("clean_acc", "C-Acc"), ("asr", "ASR"), ("ra", "RA"))
FIGURES_DIR = "figures"  # the default output folder, inside the record root / record folder
#: the columns the pratio figures read from a long results CSV
PRATIO_COLUMNS = ("kind", "dataset", "model", "attack", "pratio", "mode", "tag", "clean_acc", "asr")
#: class names for the t-SNE legend (other data sets show class indices)
CLASS_NAMES = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "fmnist": ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"),
}


# --- shared helpers ----------------------------------------------------------------------------

def _figure_class():
    """matplotlib's Figure, imported on first use with the Agg backend (no display, no pyplot state)."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install matplotlib (or pip install '.[plots]')") from None
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    return Figure


def _save(fig, out: Path) -> Path:
    """Render to PNG in memory, then write atomically (temporary name in the same folder + os.replace)."""

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    out = Path(out)
    try:
        write_bytes(out, buf.getvalue())
    except OSError as err:
        raise UserError(f"cannot write {out} ({err.strerror or err})") from None
    return out


def _num(value: Any) -> float:
    """A CSV cell as a float; empty, missing and unparsable cells are NaN."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _text(value: Any) -> str:
    """A CSV cell as text; None and NaN (a cell read back by pandas) are ""."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _mode_key(mode: str) -> tuple[int, str]:
    base = mode.split("_", 1)[0]
    return (MODE_ORDER.index(base) if base in MODE_ORDER else len(MODE_ORDER), mode)


def display_name(mode: str) -> str:
    """FT, LP, FE-tuning, FT-init, FST; a tagged folder `fst_x` reads `FST (x)`; others as given."""
    base, _, tag = mode.partition("_")
    name = MODE_NAMES.get(base, base) if base != "none" else base
    return f"{name} ({tag})" if tag else name


def read_csv_rows(path: str | Path, required: Sequence[str] = (), what: str = "CSV") -> list[dict[str, str]]:
    """All rows of a CSV file as dicts of strings. A missing, unreadable or empty file, or one without
    the `required` columns, is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = reader.fieldnames or []
    except OSError as err:
        raise UserError(f"{path}: unreadable ({err.strerror or err})") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{path}: not a readable {what} ({(str(err).splitlines() or [type(err).__name__])[0]})") from None
    if not columns:
        raise UserError(f"{path} is empty: not a {what}")
    missing = [c for c in required if c not in columns]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)} of a {what} (it has: {', '.join(columns)})")
    if not rows:
        raise UserError(f"{path} has a header but no rows")
    return rows


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (result.json, summary.json)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"{path}: unreadable ({err.strerror or err})") from None
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON, truncated? ({(str(err).splitlines() or ['?'])[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _check_png(out: str | Path, flag: str = "--out") -> Path:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"{flag} {out} must name a .png file")
    if out.is_dir():
        raise UserError(f"{flag} {out} is a folder; give a .png file name")
    return out


def _read_config(folder: Path) -> dict[str, Any]:
    """The record's config.yaml (for titles); {} when absent or unreadable."""
    try:
        data = read_yaml(folder / CONFIG_FILE)
    except (OSError, UserError):
        return {}
    return data if isinstance(data, dict) else {}


def _record_title(dataset: Any, model: Any, attack: Any, pratio: Any) -> str:
    return f"{dataset} / {model} / {attack}, pratio {pratio}"


# --- 1. metrics against the poisoning ratio ------------------------------------------------------

VARIANT_SEP = " | "  # series name = "<mode> | <differing settings>" where a cell holds several recipes


def pratio_summary(rows: Iterable[dict[str, Any]], datasets: Sequence[str] | None = None, models: Sequence[str] | None = None,
                   attacks: Sequence[str] | None = None, modes: Sequence[str] | None = None) -> dict:
    """What the pratio figures show: {(dataset, model, attack): {series: {pratio: {"asr": (mean, std, n),
    "clean_acc": (mean, std, n)}}}}, in percent, std the sample std over replicates (0 for one). A series
    is a purification mode (kind=purify rows) or "No defense" (kind=attack rows); tagged rows, other
    kinds and pratio 0 (no place on a log axis) are left out; `modes` filters only the purifications.
    Rows of different recipes (the CSV's `recipe` column) are never averaged: where one (series,
    pratio) point would mix them, each recipe becomes its own series, `<mode> | <settings that differ>`."""
    wanted = {"dataset": datasets, "model": models, "attack": attacks}
    values: dict = {}
    for row in rows:
        kind = _text(row.get("kind"))
        if kind not in ("attack", "purify") or _text(row.get("tag")):
            continue
        if any(allowed and _text(row.get(col)) not in allowed for col, allowed in wanted.items()):
            continue
        if kind == "purify" and modes and _text(row.get("mode")) not in modes:
            continue
        pratio = _num(row.get("pratio"))
        if not pratio > 0:
            continue
        key = (_text(row.get("dataset")), _text(row.get("model")), _text(row.get("attack")))
        label = NO_DEFENSE if kind == "attack" else _text(row.get("mode"))
        cell = values.setdefault(key, {}).setdefault((label, _text(row.get("recipe"))), {}).setdefault(
            pratio, {"asr": [], "clean_acc": []})
        for metric in cell:
            cell[metric].append(100 * _num(row.get(metric)))
    out = {}
    for key, series in sorted(values.items()):
        cells: dict = {}
        for (label, recipe), points in series.items():
            for pratio in points:
                cells.setdefault((label, pratio), set()).add(recipe)
        differ = results.differing_settings(cells)
        merged: dict = {}
        for (label, recipe), points in series.items():
            variant = results.recipe_label(recipe, differ) if differ else ""
            name = f"{label}{VARIANT_SEP}{variant}" if variant else label
            for pratio, cell in points.items():  # recipes that agree on every differing setting share a line
                target = merged.setdefault(name, {}).setdefault(pratio, {"asr": [], "clean_acc": []})
                for metric, vals in cell.items():
                    target[metric] += vals
        out[key] = {name: {pr: {m: _mean_std(v) for m, v in cell.items()} for pr, cell in sorted(points.items())}
                    for name, points in merged.items()}
    return out


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def _series_label(name: str) -> str:
    base, _, variant = name.partition(VARIANT_SEP)
    label = base if base == NO_DEFENSE else display_name(base)
    return f"{label} ({variant})" if variant else label


def _series_order(name: str) -> tuple:
    base, _, variant = name.partition(VARIANT_SEP)
    return (base == NO_DEFENSE, _mode_key(base), variant)


def _data_limits(values: Iterable[float], low: float = 0.0, high: float = 100.0) -> tuple[float, float]:
    """y limits that fit the values with a margin (at least 2 points wide), within [low, high] plus 3."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return low - 3, high + 3
    lo, hi = min(values), max(values)
    pad = max((hi - lo) * 0.1, 1.0)
    return max(lo - pad, low - 3), min(hi + pad, high + 3)


def plot_vs_pratio(rows: Iterable[dict[str, Any]], out_dir: str | Path, datasets: Sequence[str] | None = None,
                   models: Sequence[str] | None = None, attacks: Sequence[str] | None = None,
                   modes: Sequence[str] | None = None) -> list[Path]:
    """One PNG per (dataset, model, attack), `<out_dir>/pratio_<dataset>_<model>_<attack>.png`: ASR (0-100)
    and C-Acc (axis fitted to the data, so an accuracy cost of a few points shows) against pratio (%, log
    axis), one line per purification mode (mean over replicates, error bars = sample std where a point
    has more than one, n in the legend and, where it varies, beside each point) in the order FT, LP,
    FE-tuning, FT-init, FST, others, plus the undefended victims (dashed grey). Rows as `pratio_summary`
    selects them."""
    Figure = _figure_class()
    summary = pratio_summary(rows, datasets, models, attacks, modes)
    if not summary:
        chosen = ", ".join(f"{k} {list(v)}" for k, v in
                           (("datasets", datasets), ("models", models), ("attacks", attacks), ("modes", modes)) if v)
        raise UserError(f"no untagged attack/purify rows with pratio > 0 to plot ({chosen or 'no filter'})")
    out_dir = Path(out_dir)
    figures = []
    for (dataset, model, attack), series in summary.items():
        order = sorted(series, key=_series_order)
        pratios = sorted({pr for points in series.values() for pr in points})
        fig = Figure(figsize=(11, 5.0), layout="constrained")
        axes = fig.subplots(1, 2)
        undefended = [name for name in order if name.partition(VARIANT_SEP)[0] == NO_DEFENSE]
        for ax, (metric, name) in zip(axes, (("asr", "ASR"), ("clean_acc", "C-Acc"))):
            shown = []
            for label in order:
                points = series[label]
                xs = [100 * pr for pr in points]
                means = [p[metric][0] for p in points.values()]
                stds = [p[metric][1] if p[metric][2] > 1 else math.nan for p in points.values()]
                ns = [p[metric][2] for p in points.values()]
                shown += [m + (0 if math.isnan(d) else sign * d) for m, d in zip(means, stds) for sign in (-1, 1)]
                n_text = f"n={ns[0]}" if len(set(ns)) == 1 else f"n={min(ns)}–{max(ns)}"
                style = (dict(color="grey", linestyle="--") if undefended == [label]
                         else dict(linestyle="--") if label in undefended else {})
                bars = ax.errorbar(xs, means, yerr=stds, marker="o", markersize=4, capsize=3,
                                   label=f"{_series_label(label)}, {n_text}", **style)
                if len(set(ns)) > 1:  # say which points rest on fewer replicates
                    colour = bars.lines[0].get_color()
                    for x, y, k in zip(xs, means, ns):
                        ax.annotate(f"n={k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
            ax.set_xscale("log")
            ax.set_xticks([100 * p for p in pratios], [f"{100 * p:g}" for p in pratios])
            ax.minorticks_off()
            ax.set_xlabel("poisoning ratio (%)")
            ax.set_ylabel(f"{name} (%)")
            ax.set_ylim(*((-3, 103) if metric == "asr" else _data_limits(shown)))
            ax.grid(alpha=0.3)
            ax.set_title(name + (" (axis fitted to the data)" if metric == "clean_acc" else ""))
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=2 if len(order) > 3 else len(order),
                   fontsize=8)
        fig.suptitle(f"{dataset} / {model} / {attack}: metrics vs pratio (mean ± sample std over n replicates)")
        figures.append((fig, out_dir / f"pratio_{dataset}_{model}_{attack}.png"))
    return [_save(fig, path) for fig, path in figures]  # drawn first, written after: an error leaves no half set


# --- 2. training curves ------------------------------------------------------------------------

def _defense_runs(record_folder: Path, modes: Sequence[str] | None, tag: str) -> list[tuple[str, Path]]:
    """(mode, folder) of the purifications to draw: the named modes (each must exist) or every
    defense/<mode>[_<tag>]/ holding a metrics.csv, in the canonical mode order."""
    root = record_folder / DEFENSE_DIR
    suffix = f"_{tag}" if tag else ""
    if modes:
        runs = [(m, root / f"{m}{suffix}") for m in modes]
        for mode, folder in runs:
            if not (folder / METRICS_FILE).is_file():
                have = [m for m, _ in _defense_runs(record_folder, None, tag)]
                raise UserError(f"no purification metrics at {folder / METRICS_FILE}; modes with metrics"
                                f"{' (tag ' + tag + ')' if tag else ''}: {', '.join(have) or 'none'}")
        return runs
    runs = []
    if root.is_dir():
        for folder in root.iterdir():
            name = folder.name
            if name.startswith(".") or not (folder / METRICS_FILE).is_file():
                continue
            if tag and name.endswith(suffix) and len(name) > len(suffix):
                runs.append((name[: -len(suffix)], folder))
            elif not tag and "_" not in name:
                runs.append((name, folder))
    return sorted(runs, key=lambda r: _mode_key(r[0]))


def _points(rows: list[dict[str, str]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, percent values) of the rows where `key` was evaluated (empty/nan cells skipped)."""
    xs, ys = [], []
    for row in rows:
        epoch, value = _num(row.get("epoch")), _num(row.get(key))
        if not (math.isnan(epoch) or math.isnan(value)):
            xs.append(epoch)
            ys.append(100 * value)
    return xs, ys


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of a metrics.csv (attack/*.py or ft.py), which must have an epoch column, at least one of
    clean_acc/asr/ra, and one evaluated epoch."""
    rows = read_csv_rows(path, ("epoch",), METRICS_FILE)
    have = [key for key, _ in METRICS if key in rows[0]]
    if not have:
        raise UserError(f"{path} has none of the columns {', '.join(k for k, _ in METRICS)}: not a {METRICS_FILE} of "
                        f"attack/*.py or fine_tune/ft.py")
    empty = [key for key in have if not _points(rows, key)[0]]
    if len(empty) == len(have):
        raise UserError(f"{path} has no evaluated epoch (every {'/'.join(have)} cell is empty or not a number)")
    for key in empty:  # a panel without this run's line must not look like a run that was never made
        print(f"warning: {path}: no number in the {key} column; the {key} panel leaves this run out", file=sys.stderr)
    return rows


def _before(folder: Path, record_folder: Path) -> dict[str, float] | None:
    """The victim's C-Acc, ASR and RA before a purification (in percent): its result.json's `before`,
    else the record's summary.json (the same model); None when neither has them."""
    for path, keys in ((folder / RESULT_FILE, ("before",)), (record_folder / SUMMARY_FILE, ())):
        if not path.is_file():
            continue
        data = _read_json_object(path)
        for key in keys:
            data = data.get(key)
            if not isinstance(data, dict):
                raise UserError(f"{path}: `{key}` is not an object of clean_acc, asr and ra")
        return {k: 100 * _num(data.get(k)) for k, _ in METRICS}
    return None


def default_figure(folder: str | Path, name: str) -> Path:
    """<folder>/figures/<name>: where a figure goes without --out."""
    return Path(folder) / FIGURES_DIR / name


def plot_curves(record_folder: str | Path, out: str | Path | None = None, modes: Sequence[str] | None = None,
                tag: str = "") -> Path:
    """Four panels: the victim's training (record/metrics.csv: C-Acc, ASR, RA per epoch, 0-100), then
    C-Acc (axis fitted to the data), ASR and RA (0-100) per tuning epoch of each purification
    (defense/<mode>[_<tag>]/metrics.csv, one line per mode), each line starting at epoch 0 with the
    victim's values before purification (result.json's `before`, else the record's summary.json).
    Epochs without evaluation (empty or nan cells, ft.py --eval_every k) are skipped, and every
    evaluated epoch gets a marker, so sparse curves stay readable. Default `out`:
    <record_folder>/figures/curves[_<tag>].png."""
    Figure = _figure_class()
    from matplotlib.ticker import MaxNLocator

    folder = Path(record_folder)
    out = _check_png(out if out is not None else default_figure(folder, f"curves{'_' + tag if tag else ''}.png"))
    metrics = folder / METRICS_FILE
    if not metrics.is_file():
        raise UserError(f"{metrics} does not exist; {folder} is not a record folder (or its attack did not finish)")
    victim = read_metrics(metrics)
    runs = [(mode, read_metrics(f / METRICS_FILE), _before(f, folder)) for mode, f in _defense_runs(folder, modes, tag)]
    cfg = _read_config(folder)
    fig = Figure(figsize=(18, 4.4), layout="tight")
    axes = fig.subplots(1, 4)
    for key, label in METRICS:
        axes[0].plot(*_points(victim, key), marker="o", markersize=3, label=label)
    axes[0].set_title(f"victim training ({cfg.get('attack', 'attack')})")
    acc_values = []
    for ax, (key, label) in zip(axes[1:], METRICS):
        for mode, rows, before in runs:
            xs, ys = _points(rows, key)
            if before is not None and not math.isnan(before[key]):
                xs, ys = [0.0, *xs], [before[key], *ys]
            ax.plot(xs, ys, marker="o", markersize=3, label=display_name(mode))
            if key == "clean_acc":
                acc_values += ys
        ax.set_title(f"{label} during purification" + (" (axis fitted)" if key == "clean_acc" else ""))
        if not runs:
            ax.text(0.5, 0.5, "no purification results", ha="center", va="center", transform=ax.transAxes)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        lo, hi = ax.get_xlim()
        if hi - lo < 1:  # a single evaluated epoch: keep whole-number ticks around it
            ax.set_xlim(round((lo + hi) / 2) - 1, round((lo + hi) / 2) + 1)
        ax.set_xlabel("epoch (0: before purification)" if ax is not axes[0] else "epoch")
        ax.set_ylabel("%")
        ax.set_ylim(*(_data_limits(acc_values) if ax is axes[1] and acc_values else (-3, 103)))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    title = _record_title(cfg.get("dataset", "?"), cfg.get("model", "?"), cfg.get("attack", "?"), cfg.get("pratio", "?"))
    fig.suptitle(title + (f" (tag {tag})" if tag else ""))
    return _save(fig, out)


# --- 3. t-SNE of penultimate features ------------------------------------------------------------

def _features(model, images: torch.Tensor, pipeline, amp: torch.dtype | None, batch_size: int = 256) -> torch.Tensor:
    """Penultimate features (N, D) in float32."""
    return engine.batched(model, images, pipeline, lambda net, x: net.features(x).float().flatten(1), batch_size, amp)


def _class_colours(num_classes: int):
    import matplotlib

    name = "tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "turbo"
    cmap = matplotlib.colormaps[name]
    return (lambda c: cmap(c % cmap.N)) if name != "turbo" else (lambda c: cmap(c / max(num_classes - 1, 1)))


def class_names(dataset: str, num_classes: int) -> list[str]:
    """The data set's class names where known (CIFAR-10, Fashion-MNIST), else "class <i>"."""
    names = CLASS_NAMES.get(dataset)
    if names and len(names) == num_classes:
        return [f"{i} {name}" for i, name in enumerate(names)]
    return [f"class {i}" for i in range(num_classes)]


def tsne_figure_name(modes: Sequence[str]) -> str:
    """tsne_<mode>-<mode>.png: the default file name, one per choice of modes."""
    return f"tsne_{'-'.join(modes) or 'none'}.png"


def plot_tsne(record_folder: str | Path, out: str | Path | None = None, modes: Sequence[str] = ("ft", "fst"), n: int = 500, seed: int = 0,
              device: str | torch.device = "cpu", dataset_path: str | Path | None = None, *, amp: torch.dtype | None = None,
              perplexity: float = 30.0, iterations: int = 750, progress: bool = False) -> Path:
    """The feature-shift picture: one t-SNE panel per model (the backdoored one, then each purified
    defense/<mode>/model.pt) of the penultimate features of n seeded-random clean test images
    (coloured by true class) and n seeded-random backdoor test images (black crosses); every model sees
    the same images. Also writes `<out stem>.json` with each panel's separation score: the
    leave-one-out 5-NN accuracy, in the 2-D embedding, of telling poisoned from clean points (high:
    the poisoned samples form their own cluster). A visible trigger (BadNet's patch) can keep poisoned
    features apart even after the backdoor is gone, so the JSON also holds two scores computed in the
    feature space itself: the share of poisoned images whose 5 nearest clean images are mostly of their
    true class (rises when purification works) or of the target class (falls)."""

    Figure = _figure_class()
    import matplotlib.lines as mlines

    folder = Path(record_folder)
    out = _check_png(out if out is not None else default_figure(folder, tsne_figure_name(list(modes))))
    if n < 5:
        raise UserError(f"--n {n}: the picture needs at least 5 clean and 5 poisoned images")
    modes = list(modes)
    for mode in modes:  # fail before any work when a purified model was not kept
        path = defense_folder(folder, mode) / MODEL_FILE
        if not path.is_file():
            raise UserError(f"{path} does not exist: the purification kept no weights; rerun fine_tune/ft.py "
                            f"--ft_mode {mode.split('_', 1)[0]} --save true (with --overwrite true if its result exists)")
    record = load_record(folder)
    dev = engine.resolve_device(str(device))
    exp = rebuild_experiment(record, str(dataset_path or "data"), dev)
    pipe = exp.pipeline
    n_clean, n_bd = min(n, len(exp.clean_test.labels)), min(n, len(exp.bd_test.targets))
    if n_bd < 5:
        raise UserError(f"{folder}: only {n_bd} backdoor test images; the picture needs at least 5")
    cpu = torch.device("cpu")
    clean_idx = torch.randperm(len(exp.clean_test.labels), generator=engine.make_generator(seed, cpu, "tsne-clean"))[:n_clean]
    bd_idx = torch.randperm(len(exp.bd_test.targets), generator=engine.make_generator(seed, cpu, "tsne-poisoned"))[:n_bd]
    images = torch.cat([exp.clean_test.images[clean_idx.to(dev)], exp.bd_test.images[bd_idx.to(dev)]])
    classes = exp.clean_test.labels[clean_idx.to(dev)].cpu()
    bd_true = exp.bd_test.true_labels[bd_idx.to(dev)].cpu()
    bd_target = exp.bd_test.targets[bd_idx.to(dev)].cpu()
    is_poisoned = torch.cat([torch.zeros(n_clean, dtype=torch.long), torch.ones(n_bd, dtype=torch.long)])

    panels = []
    for source in tqdm([NONE, *modes], desc="models", leave=False, disable=not progress):
        state = load_source_state(record, folder, source)
        where = str(folder / RECORD_FILE) if source == NONE else str(defense_folder(folder, source) / MODEL_FILE)
        model = build_loaded_model(record, state, where, pipe, dev)
        feats = _features(model, images, pipe, amp)
        del model
        emb = tsne(feats, perplexity=perplexity, iterations=iterations, seed=seed, progress=progress).cpu()
        vote = knn_vote(feats[:n_clean].cpu(), classes, feats[n_clean:].cpu(), k=5)
        panels.append({"model": source, "label": "Backdoored" if source == NONE else display_name(source),
                       "separation_5nn": knn_separation(emb, is_poisoned, k=5),
                       "poisoned_nn_true_class": float((vote == bd_true).double().mean()),
                       "poisoned_nn_target": float((vote == bd_target).double().mean()), "embedding": emb})

    num_classes = int(record["num_classes"])
    colour = _class_colours(num_classes)
    fig = Figure(figsize=(4.6 * len(panels) + 2.2, 4.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        emb = panel["embedding"]
        ax.scatter(emb[:n_clean, 0], emb[:n_clean, 1], s=6, alpha=0.6, c=[colour(int(c)) for c in classes], linewidths=0)
        ax.scatter(emb[n_clean:, 0], emb[n_clean:, 1], s=14, c="black", marker="x", linewidths=0.8)
        ax.set_title(f"{panel['label']}\npoisoned next to their true class {panel['poisoned_nn_true_class']:.0%}, "
                     f"to the target {panel['poisoned_nn_target']:.0%}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    all2all = record.get("attack_label_trans") == "all2all"
    poisoned = mlines.Line2D([], [], color="black", marker="x", linestyle="", markersize=5,
                             label="poisoned (all2all)" if all2all else f"poisoned (target {record['attack_target']})")
    names = class_names(str(record["dataset"]), num_classes)
    shown = sorted({int(c) for c in classes})
    if len(shown) <= 20:  # one key entry per class drawn
        handles = [mlines.Line2D([], [], color=colour(c), marker="o", linestyle="", markersize=5, label=names[c])
                   for c in shown]
    else:  # too many for a key: say how the colours run
        handles = [mlines.Line2D([], [], color=colour(shown[0]), marker="o", linestyle="", markersize=5,
                                 label=f"clean, coloured by class ({names[shown[0]]} … {names[shown[-1]]}, turbo colours)")]
    fig.legend(handles=[*handles, poisoned], loc="outside right center", fontsize=8, title="clean: true class", title_fontsize=8)
    fig.suptitle(f"{_record_title(record['dataset'], record['model_name'], record['attack'], record['pratio'])}: "
                 f"penultimate features, t-SNE of {n_clean} clean + {n_bd} poisoned test images")
    _save(fig, out)
    write_json(out.with_suffix(".json"), {
        "record": f"{record['dataset']}/{record['attack']}/{folder.name}", "image": out.name,
        "n_clean": n_clean, "n_poisoned": n_bd, "seed": seed, "iterations": iterations,
        "perplexity": min(perplexity, (n_clean + n_bd - 1) / 3.0),  # as tsne() lowers it for small sets
        "score": "separation_5nn: leave-one-out 5-NN accuracy of poisoned vs clean in the 2-D embedding",
        "feature_scores": "poisoned_nn_true_class / poisoned_nn_target: share of poisoned images whose 5 nearest clean "
                          "images in the penultimate feature space are mostly of their true class / of the backdoor target",
        "panels": [{k: v for k, v in p.items() if k != "embedding"} for p in panels],
    })
    return out


# --- 4. O-ASR against P-ASR ------------------------------------------------------------------------

OPASR_ROLES = ("clean", "backdoored", "defense")  # the clean model (pratio 0), the unpurified one, purified ones


def _opasr_label(role: str, defense: str) -> str:
    return "clean model" if role == "clean" else "no defense" if role == "backdoored" else display_name(defense)


def opasr_summary(rows: Iterable[dict[str, Any]], retune_tag: str = "", datasets: Sequence[str] | None = None,
                  models: Sequence[str] | None = None, attacks: Sequence[str] | None = None,
                  modes: Sequence[str] | None = None, pratios: Sequence[float] | None = None) -> dict:
    """What the O-ASR / P-ASR figures show: {(dataset, model): [point, ...]}, one point per model under
    test (the clean model of a pratio-0 record, the unpurified model, each defense folder), attack,
    pratio and recipe, from the retuning results of RA tag `retune_tag` (kind=retune rows): x = O-ASR,
    the ASR of the model just before RA (the purified model as its purification left it: the same
    weights and test set as its result.json's `after`), y = P-ASR, the ASR after RA; both in percent,
    mean and sample std over replicates (runs that differ only in their seeds). Rows of different
    recipes are never averaged: where one point would mix them, each recipe is its own point, named by
    the settings that differ. `modes` filters the defenses only (the references always stay)."""
    groups: dict = {}
    for row in rows:
        if _text(row.get("kind")) != "retune" or _text(row.get("tag")) != retune_tag:
            continue
        dataset, model, attack = _text(row.get("dataset")), _text(row.get("model")), _text(row.get("attack"))
        if (datasets and dataset not in datasets) or (models and model not in models) or (attacks and attack not in attacks):
            continue
        pratio, defense = _num(row.get("pratio")), _text(row.get("mode"))
        if pratios and not any(abs(pratio - p) <= 1e-9 for p in pratios) and pratio != 0:
            continue
        role = "defense" if defense != NONE else "clean" if pratio == 0 else "backdoored"
        if role == "defense" and modes and defense.split("_", 1)[0] not in modes and defense not in modes:
            continue
        key = (role, defense, attack, pratio)
        cell = groups.setdefault((dataset, model), {}).setdefault(key, {}).setdefault(
            _text(row.get("recipe")), {"x": [], "y": [], "paths": []})
        cell["x"].append(100 * _num(row.get("before_asr")))
        cell["y"].append(100 * _num(row.get("asr")))
        cell["paths"].append(_text(row.get("path")))
    out = {}
    for (dataset, model), cells in sorted(groups.items()):
        differ = results.differing_settings({key: set(recipes) for key, recipes in cells.items()})
        shown_pratios = {key[3] for key in cells if key[3] > 0}
        points = []
        for (role, defense, attack, pratio), recipes in sorted(
                cells.items(), key=lambda kv: (OPASR_ROLES.index(kv[0][0]), _mode_key(kv[0][1]), kv[0][2], kv[0][3])):
            for recipe, cell in recipes.items():
                variant = results.recipe_label(recipe, differ) if len(recipes) > 1 else ""
                x, y = _mean_std(cell["x"]), _mean_std(cell["y"])
                label = f"{_opasr_label(role, defense)} · {results.attack_name(attack)}"
                if len(shown_pratios) > 1 and pratio > 0:
                    label += f" · pratio {pratio:g}"
                points.append({"role": role, "defense": defense, "attack": attack, "pratio": pratio,
                               "label": label + (f" ({variant})" if variant else ""), "variant": variant,
                               "o_asr": x[0], "o_asr_std": x[1], "p_asr": y[0], "p_asr_std": y[1], "n": x[2],
                               "results": sorted(cell["paths"])})
        out[(dataset, model)] = points
    return out


def _free_label_slot(placed: list[tuple[float, float, float, float]], at: tuple[float, float], chars: int) -> int:
    """How many lines below its point a label must go not to cover an earlier one: labels as boxes in
    data units (the figure is about 0.2 units per typographic point; 7 pt text, 9 pt lines); the box
    chosen is added to `placed`."""
    x0, width = at[0] + 1.0, 0.85 * chars
    for shift in range(40):
        y = at[1] + 0.2 * (4 - 9 * shift)
        box = (x0, x0 + width, y, y + 1.6)
        if not any(b[0] < box[1] and box[0] < b[1] and b[2] < box[3] and box[2] < b[3] for b in placed):
            placed.append(box)
            return shift
    return 0


def _distinct_colours(names: Sequence[str]) -> dict[str, Any]:
    """A colour per name, none of them grey or black (the reference points'): tab10 for up to eight
    names, else the 18 non-grey colours of tab20, so that the eleven defenses of the 2024 comparison
    never share one (matplotlib's default cycle repeats after ten)."""
    import matplotlib

    if len(names) <= 8:
        palette = [c for i, c in enumerate(matplotlib.colormaps["tab10"].colors) if i != 7]
    else:
        palette = [c for i, c in enumerate(matplotlib.colormaps["tab20"].colors) if i not in (14, 15)]
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def plot_opasr(rows: Iterable[dict[str, Any]], out_dir: str | Path, retune_tag: str = "", **filters) -> list[Path]:
    """One PNG per (dataset, model), `<out_dir>/opasr_<dataset>_<model>[_<retune_tag>].png`, and its JSON
    beside it: a labelled point per defense and attack at (O-ASR, P-ASR) as `opasr_summary` computes them
    (error bars: sample std where a point has several replicates), the clean and the unpurified models as
    reference points (grey square, black triangle), and the diagonal P-ASR = O-ASR. A point high above
    the diagonal is a defense whose backdoor the retuning attack brings back (superficial safety)."""
    Figure = _figure_class()
    summary = opasr_summary(rows, retune_tag, **filters)
    if not summary:
        where = f"retune_{retune_tag}" if retune_tag else "retune"
        raise UserError(f"no retuning results ({where}/result.json of fine_tune/ft_poison.py) to plot"
                        + (f" matching {', '.join(f'{k} {list(v)}' for k, v in filters.items() if v)}" if any(filters.values()) else ""))
    out_dir = Path(out_dir)
    drawn = []
    for (dataset, model), points in summary.items():
        fig = Figure(figsize=(8.5, 7.5), layout="constrained")
        ax = fig.subplots()
        ax.plot([0, 100], [0, 100], color="grey", linestyle=":", linewidth=1, label="P-ASR = O-ASR")
        colours = _distinct_colours(list(dict.fromkeys(p["defense"] for p in points if p["role"] == "defense")))
        markers = {a: m for a, m in zip(sorted({p["attack"] for p in points}), "oDvPX*hp<>")}
        placed: list[tuple[float, float, float, float]] = []
        for point in points:
            role = point["role"]
            style = (dict(color="grey", marker="s") if role == "clean" else dict(color="black", marker="^")
                     if role == "backdoored" else dict(marker=markers.get(point["attack"], "o")))
            if role == "defense" and point["defense"] in colours:
                style["color"] = colours[point["defense"]]
            xerr = point["o_asr_std"] if point["n"] > 1 else None
            yerr = point["p_asr_std"] if point["n"] > 1 else None
            bars = ax.errorbar([point["o_asr"]], [point["p_asr"]], xerr=xerr, yerr=yerr, linestyle="", markersize=7,
                               capsize=3, **style)
            colour = bars.lines[0].get_color()
            text = point["label"] + (f", n={point['n']}" if point["n"] > 1 else "")
            here = (point["o_asr"], point["p_asr"])
            shift = _free_label_slot(placed, here, len(text))
            ax.annotate(text, here, textcoords="offset points", xytext=(5, 4 - 9 * shift), fontsize=7, color=colour)
        ax.set_xlim(-3, 103)
        ax.set_ylim(-3, 103)
        ax.set_xlabel("O-ASR: ASR after purification (%)")
        ax.set_ylabel(f"P-ASR: ASR after the retuning attack{' (' + retune_tag + ')' if retune_tag else ''} (%)")
        ax.grid(alpha=0.3)
        ax.set_title(f"{dataset} / {model}: backdoor after purification vs after RA")
        name = f"opasr_{dataset}_{model}{'_' + retune_tag if retune_tag else ''}.png"
        drawn.append((fig, out_dir / name, points))
    written = []
    for fig, path, points in drawn:  # drawn first, written after: an error leaves no half set
        written.append(_save(fig, path))
        json_path = path.with_suffix(".json")
        write_json(json_path, {"image": path.name, "retune_tag": retune_tag,
                               "x": "O-ASR: ASR of the model just before the retuning attack (after purification)",
                               "y": "P-ASR: ASR after the retuning attack", "unit": "percent, mean and sample std over replicates",
                               "points": points})
        written.append(json_path)
    return written


# --- CLI ---------------------------------------------------------------------------------------

def _add_filters(parser: argparse.ArgumentParser, modes_help: str) -> None:
    """The selection flags the figures of a record root share."""
    parser.add_argument("--dataset", nargs="+", help="only these datasets")
    parser.add_argument("--model", nargs="+", help="only these models")
    parser.add_argument("--attacks", nargs="+", help="only these attacks")
    parser.add_argument("--modes", nargs="+", help=modes_help)


def build_parser() -> argparse.ArgumentParser:

    p = ArgumentParser(prog="python -m utils.plots", description="PNG figures of sweep results, "
                                "training curves and feature t-SNE (needs matplotlib)")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pratio", help="ASR and C-Acc against pratio, one PNG per dataset/model/attack")
    a.add_argument("root", nargs="?", help="record root to collect results from (as python -m utils.results does)")
    a.add_argument("--csv", help="or: the long results CSV of python -m utils.results --csv")
    a.add_argument("--out", help="folder for the PNGs (default: <root>/figures, or figures/ beside the CSV)")
    _add_filters(a, "only these purification modes")
    o = sub.add_parser("opasr", help="O-ASR against P-ASR (after purification vs after RA), one PNG per dataset/model")
    o.add_argument("root", help="record root to collect results from (as python -m utils.results does)")
    o.add_argument("--out", help="folder for the PNGs and JSONs (default: <root>/figures)")
    o.add_argument("--retune_tag", default="", help="which retuning results: '' = retune/ (default), p20 = retune_p20/")
    _add_filters(o, "only these defenses (mode or defense folder names; references always shown)")
    o.add_argument("--pratio", nargs="+", type=float, help="only these poisoning ratios (the clean model always shown)")
    c = sub.add_parser("curves", help="training curves of a record and its purifications")
    c.add_argument("record_folder")
    c.add_argument("--out", help="the PNG to write (default <record_folder>/figures/curves[_<tag>].png)")
    c.add_argument("--modes", nargs="+", help="purification modes (default: every one with metrics)")
    c.add_argument("--tag", default="", help="draw defense/<mode>_<tag>/ instead of defense/<mode>/")
    t = sub.add_parser("tsne", help="t-SNE of penultimate features, backdoored vs purified models")
    t.add_argument("record_folder")
    t.add_argument("--out", help="the PNG to write, scores go to the .json beside it "
                   "(default <record_folder>/figures/tsne_<modes>.png)")
    t.add_argument("--modes", nargs="+", default=["ft", "fst"], help="purified models under defense/ (default ft fst)")
    t.add_argument("--n", type=int, default=500, help="clean and poisoned test images each (default 500)")
    t.add_argument("--seed", type=int, default=0, help="image choice and t-SNE seed (default 0)")
    t.add_argument("--dataset_path", default="data", help="folder holding the datasets (default data)")
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    t.add_argument("--amp", default="none", choices=("auto", "bf16", "fp16", "none"),
                   help="mixed precision of the feature extraction (default none)")
    t.add_argument("--progress", type=parse_progress, default="auto",
                   help="progress bars: true, false or auto (default auto: only on a terminal)")
    return p


def _pratio_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], Path]:
    """The rows for the pratio figures, from a record root or a long CSV, and the default output folder."""
    if (args.root is None) == (args.csv is None):
        raise UserError("pratio needs a record root or --csv FILE (one of them): python -m utils.plots pratio RECORD_ROOT")
    if args.csv is not None:
        csv_path = Path(args.csv)
        return read_csv_rows(csv_path, PRATIO_COLUMNS, "long results CSV (python -m utils.results --csv)"), \
            csv_path.parent / FIGURES_DIR
    rows, warnings = results.collect(args.root)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not rows:
        raise UserError(f"no results under {args.root} (no record folder with config.yaml and summary.json)")
    return rows, Path(args.root) / FIGURES_DIR


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    # --modes and --tag become parts of the paths read (defense/<mode>[_<tag>]/): plain names only
    for mode in (args.modes or []) if args.command != "pratio" else []:
        if folder_name(mode):
            raise UserError(f"--modes {short(mode)} {folder_name(mode)}")
    if tag(getattr(args, "tag", "")):
        raise UserError(f"--tag {short(args.tag)} {tag(args.tag)}")
    if args.command == "pratio":
        rows, default_out = _pratio_rows(args)
        out_dir = Path(args.out) if args.out is not None else default_out
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"--out {out_dir} is a file; the pratio figures need a folder")
        written = plot_vs_pratio(rows, out_dir, args.dataset, args.model, args.attacks, args.modes)
    elif args.command == "opasr":
        rows, default_out = _pratio_rows(argparse.Namespace(root=args.root, csv=None))
        out_dir = Path(args.out) if args.out is not None else default_out
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"--out {out_dir} is a file; the opasr figures need a folder")
        written = plot_opasr(rows, out_dir, args.retune_tag, datasets=args.dataset, models=args.model, attacks=args.attacks,
                             modes=args.modes, pratios=args.pratio)
    elif args.command == "curves":
        written = [plot_curves(args.record_folder, args.out, args.modes, args.tag)]
    else:
        device = engine.resolve_device(args.device)
        out = plot_tsne(args.record_folder, args.out, args.modes, args.n, args.seed, device, args.dataset_path,
                        amp=engine.amp_dtype(args.amp, device), progress=args.progress)
        written = [out, out.with_suffix(".json")]
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    run_cli(main)
