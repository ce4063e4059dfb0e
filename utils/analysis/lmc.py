"""Linear mode connectivity between a record's backdoored model and its purified models.

    python -m utils.lmc RECORD_FOLDER [--modes ft pam ...] [--points 11] [--out FILE.png]
                                      [--dataset_path data] [--device auto]

For each purified model (every defense/<mode>/model.pt of the record, or --modes), the weights
theta(t) = (1 - t) * theta_backdoored + t * theta_purified are evaluated on a grid of t from 0 to 1:
C-Acc, ASR and RA on the record's test sets, the clean loss (cross-entropy on the clean test set) and
the backdoor loss (cross-entropy of the backdoor test set against the backdoor labels: low while the
backdoor works). Only floating-point parameters and buffers are interpolated; integer buffers
(BatchNorm's num_batches_tracked) keep the backdoored model's value.

A BatchNorm layer's running statistics of an interpolated network are not the interpolation of the
endpoints' statistics, so, as is standard for LMC, they are recomputed at every point: reset, then one
pass in train mode over the clean tuning images of that purification (the same indices it tuned on,
recomputed from its result.json and checked against its digest), evaluation transform (no
augmentation), no gradient, every other layer in eval mode (dropout off), a cumulative average over
the batches (momentum None). Both ends are treated the same way, so t=0 is the backdoored model and
t=1 the purified one, each with its statistics recomputed on that tuning set; the JSON also holds the
two endpoint models' metrics with their own statistics (`reference`), and `--bn_recompute false`
evaluates the plain interpolation (whose ends are then exactly the two models).

Writes <out>.png (panels C-Acc, ASR, loss against t; one curve per defense) and <out>.json (per defense:
the t grid, the curves, the barriers); by default <RECORD_FOLDER>/figures/lmc.png and lmc.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from utils import engine
from utils.analysis.plots import _check_png, _figure_class, _mode_key, _record_title, _save, default_figure, display_name
from utils.commands.driver import build_loaded_model, load_source_state, record_label, start_runtime
from utils.config import ArgumentParser, parse_bool, parse_progress
from utils.defenses.purify import tuning_indices
from utils.errors import UserError
from utils.record.layout import DEFENSE_DIR, MODEL_FILE, NONE, RECORD_FILE, RESULT_FILE, available_defenses, source_folder
from utils.record.resources import tensor_digest
from utils.record.store import load_record, write_json

DEFAULT_POINTS = 11
FIGURE_NAME = "lmc.png"
BN_TYPES = (nn.modules.batchnorm._BatchNorm,)  # BatchNorm1d/2d/3d and SyncBatchNorm
DEFINITIONS = {
    "asr_barrier": "max over t of ASR(t) minus max(ASR(0), ASR(1)): how far the path's ASR rises above both ends",
    "clean_acc_barrier": "min(C-Acc(0), C-Acc(1)) minus min over t of C-Acc(t): the accuracy dip along the path",
    "clean_loss_barrier": "max over t of clean_loss(t) - ((1 - t) clean_loss(0) + t clean_loss(1)) (Frankle et al. 2020)",
    "backdoor_loss_barrier": "the same for the backdoor loss: high when the purified model left the backdoored "
                             "model's basin, about 0 when a straight low-backdoor-loss path leads back to it",
    "asr_mean": "mean ASR over the grid (area under the ASR curve): high when the backdoor persists along most of the path",
}


# --- the interpolation ----------------------------------------------------------------------------

def interpolate_state(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    """(1 - t) * start + t * end for every floating-point tensor; other tensors (integer buffers such as
    BatchNorm's num_batches_tracked) are `start`'s. The two states must have the same keys and shapes."""
    if start.keys() != end.keys():
        extra = sorted(set(start) ^ set(end))
        raise UserError(f"the two models have different weights ({', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}): "
                        "not the same architecture")
    out = {}
    for key, a in start.items():
        b = end[key]
        if a.shape != b.shape:
            raise UserError(f"weight {key} has shape {tuple(a.shape)} in one model and {tuple(b.shape)} in the other")
        out[key] = a * (1.0 - t) + b.to(a.dtype) * t if a.is_floating_point() else a.clone()
    return out


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, images: torch.Tensor, pipeline: engine.Pipeline, batch_size: int = 128,
                        amp: torch.dtype | None = None) -> int:
    """Reset every BatchNorm layer's running statistics and re-estimate them from `images` (uint8):
    the BatchNorm layers in train mode, everything else in eval mode, the evaluation transform,
    no gradient, a cumulative average over the batches. Leaves the model in eval mode; returns the
    number of BatchNorm layers (0: nothing to do)."""
    layers = batchnorm_layers(model)
    model.eval()
    if not layers or not len(images):
        return len(layers)
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the plain mean of the batches' statistics
        m.train()
    try:
        for start in range(0, len(images), batch_size):
            x = pipeline.eval_batch(images[start:start + batch_size])
            with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
                model(x)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.eval()
    return len(layers)


def _scores(model: nn.Module, exp, batch_size: int, amp: torch.dtype | None) -> dict[str, float]:
    """C-Acc, ASR, RA (as the one evaluator computes them: argmax of the same batched logits) and the
    clean and backdoor cross-entropy losses."""
    logits = lambda images: engine.batched(model, images, exp.pipeline, lambda net, x: net(x).float(), batch_size, amp)  # noqa: E731
    nan = float("nan")
    out = {}
    clean, labels = exp.clean_test.images, exp.clean_test.labels
    if len(labels):
        z = logits(clean)
        out["clean_acc"] = float((z.argmax(1) == labels).float().mean())
        out["clean_loss"] = float(F.cross_entropy(z, labels))
    else:
        out["clean_acc"] = out["clean_loss"] = nan
    bd = exp.bd_test
    if len(bd.targets):
        z = logits(bd.images)
        pred = z.argmax(1)
        out["asr"] = float((pred == bd.targets).float().mean())
        out["ra"] = float((pred == bd.true_labels).float().mean())
        out["backdoor_loss"] = float(F.cross_entropy(z, bd.targets))
    else:
        out["asr"] = out["ra"] = out["backdoor_loss"] = nan
    return out


def barriers(curve: dict[str, list[float]]) -> dict[str, float]:
    """The summaries of one path (see DEFINITIONS)."""
    ts = curve["t"]

    def over_line(values: list[float]) -> float:
        return max(v - ((1 - t) * values[0] + t * values[-1]) for t, v in zip(ts, values))

    asr, acc = curve["asr"], curve["clean_acc"]
    return {"asr_barrier": max(asr) - max(asr[0], asr[-1]),
            "clean_acc_barrier": min(acc[0], acc[-1]) - min(acc),
            "clean_loss_barrier": over_line(curve["clean_loss"]),
            "backdoor_loss_barrier": over_line(curve["backdoor_loss"]),
            "asr_mean": sum(asr) / len(asr)}


def t_grid(points: int) -> list[float]:
    if points < 2:
        raise UserError(f"--points {points}: the path needs at least 2 points (its two ends)")
    if points > 1001:
        raise UserError(f"--points {points}: at most 1001 points")
    return [i / (points - 1) for i in range(points)]


def path_curve(model: nn.Module, start: dict, end: dict, ts: Sequence[float], exp, bn_images: torch.Tensor | None,
               bn_batch_size: int, batch_size: int, amp: torch.dtype | None, progress: bool = False,
               desc: str = "path") -> dict[str, list[float]]:
    """The metrics at each t of the straight path from `start` to `end` (state dicts on the CPU),
    evaluated in `model` (an instance of the architecture, on the device); BatchNorm statistics
    recomputed on `bn_images` at every point unless it is None."""
    curve: dict[str, list[float]] = {k: [] for k in ("t", "clean_acc", "asr", "ra", "clean_loss", "backdoor_loss")}
    for t in tqdm(ts, desc=desc, leave=False, disable=not progress):
        model.load_state_dict(interpolate_state(start, end, t))
        if bn_images is not None:
            recompute_batchnorm(model, bn_images, exp.pipeline, bn_batch_size, amp)
        model.eval()
        scores = _scores(model, exp, batch_size, amp)
        curve["t"].append(t)
        for key in curve:
            if key != "t":
                curve[key].append(scores[key])
    return curve


# --- the command ----------------------------------------------------------------------------------

def _tuning_plan(folder: Path, mode: str) -> dict:
    """Split ratio, seed, split mode and digest of a purification's tuning subset (its result.json)."""
    path = source_folder(folder, mode) / RESULT_FILE
    try:
        result = json.loads(path.read_text())
        used = result["args"]
        return {"split_ratio": float(used["split_ratio"]), "random_seed": int(used["random_seed"]),
                "split_mode": str(used.get("split_mode") or "uniform"), "digest": result.get("tuning_digest")}
    except FileNotFoundError:
        raise UserError(f"{path} does not exist: the tuning set of {mode} is unknown (a model.pt without its "
                        "purification result); rerun fine_tune/ft.py for it") from None
    except OSError as err:
        raise UserError(f"{path}: unreadable ({err.strerror or err})") from None
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a readable purification result ({type(err).__name__}: {err})") from None


def _modes(folder: Path, given: Sequence[str] | None) -> list[str]:
    have = available_defenses(folder)
    if not given:
        if not have:
            raise UserError(f"{folder} has no purified model (no {DEFENSE_DIR}/<mode>/{MODEL_FILE}); purify it with "
                            "fine_tune/ft.py --save true first")
        return sorted(have, key=_mode_key)  # the registry's order, as the other figures
    modes = list(dict.fromkeys(given))
    for mode in modes:
        if mode == NONE:
            raise UserError("--modes none: the backdoored model is the start of every path, not a defense")
        if not mode or "/" in mode or "\\" in mode or mode.startswith("."):
            raise UserError(f"--modes {mode!r} is not a folder name under {DEFENSE_DIR}/ (e.g. ft, pam, fst_<tag>)")
        path = source_folder(folder, mode) / MODEL_FILE
        if not path.is_file():
            raise UserError(f"no purified model at {path}; defenses with weights in this record: "
                            f"{', '.join(have) if have else 'none'}")
    return modes


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m utils.lmc", description="Linear mode connectivity: C-Acc, ASR and losses along "
                       "the straight path from the backdoored model to each purified model (BatchNorm statistics "
                       "recomputed on the clean tuning set at every point).")
    a = p.add_argument
    a("record_folder", help="a record folder (holding attack_result.pt and defense/<mode>/model.pt)")
    a("--modes", nargs="+", help="purified models under defense/ (default: every one with a model.pt)")
    a("--points", type=int, default=DEFAULT_POINTS, help=f"points of the t grid from 0 to 1 (default {DEFAULT_POINTS})")
    a("--out", help="the PNG to write, the JSON goes beside it (default <record_folder>/figures/lmc.png)")
    a("--bn_recompute", type=parse_bool, default=True,
      help="recompute BatchNorm statistics on the tuning set at every point (default true)")
    a("--bn_batch_size", type=int, default=128, help="batch size of the BatchNorm pass (default 128)")
    a("--dataset_path", default="data", help="folder holding the datasets (default data)")
    a("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    a("--amp", default="none", choices=("auto", "bf16", "fp16", "none"), help="mixed precision (default none)")
    a("--eval_batch_size", type=int, default=0, help="evaluation batch size (default 0: 1024 on GPU, 256 on CPU)")
    a("--progress", type=parse_progress, default="auto", help="progress bars: true, false or auto (default auto)")
    return p


def run_lmc(args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """Check everything, compute every path, draw and write; returns (png, json, the JSON's content)."""
    folder = Path(args.record_folder)
    if not (folder / RECORD_FILE).is_file():
        raise UserError(f"{folder} is not a record folder (no {RECORD_FILE})")
    out = _check_png(args.out if args.out is not None else default_figure(folder, FIGURE_NAME))
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():  # checked before the work, not found when writing after it
        raise UserError(f"--out {out}: {parent} is a file, not a folder")
    ts = t_grid(args.points)
    if args.bn_batch_size < 1:
        raise UserError(f"--bn_batch_size {args.bn_batch_size} must be positive")
    if args.eval_batch_size < 0:
        raise UserError(f"--eval_batch_size {args.eval_batch_size} must be 0 (automatic) or positive")
    Figure = _figure_class()  # fail before any work when matplotlib is missing
    record = load_record(folder)
    modes = _modes(folder, args.modes)
    start = {k: v.cpu() for k, v in load_source_state(record, folder, NONE).items()}
    ends = {m: {k: v.cpu() for k, v in load_source_state(record, folder, m).items()} for m in modes}
    plans = {m: _tuning_plan(folder, m) for m in modes}
    for m, end in ends.items():
        interpolate_state(start, end, 0.5)  # a model.pt of another architecture fails here, before the data loads
    rt = start_runtime(args, record)
    exp, amp = rt.exp, rt.amp
    model = build_loaded_model(record, start, str(folder / RECORD_FILE), exp.pipeline, rt.device)
    bn_layers = len(batchnorm_layers(model))
    reference = {NONE: _scores(model, exp, args.eval_batch_size, amp)}
    paths = {}
    for mode in modes:
        plan = plans[mode]
        idx = tuning_indices(exp.clean_train.labels, plan["split_ratio"], plan["random_seed"], plan["split_mode"] == "balanced")
        if plan["digest"] is not None and tensor_digest(idx) != plan["digest"]:
            raise UserError(f"the recomputed tuning subset of {mode} differs from the one its purification used (digest "
                            f"{tensor_digest(idx)} vs {plan['digest']}): the dataset on disk changed")
        model.load_state_dict(ends[mode])
        reference[mode] = _scores(model.eval(), exp, args.eval_batch_size, amp)
        bn_images = exp.clean_train.images[idx].to(rt.device) if args.bn_recompute else None
        curve = path_curve(model, start, ends[mode], ts, exp, bn_images, args.bn_batch_size, args.eval_batch_size, amp,
                           args.progress, desc=mode)
        paths[mode] = {"label": display_name(mode), **curve, **barriers(curve),
                       "tuning": {k: plan[k] for k in ("split_ratio", "random_seed", "split_mode")},
                       "tuning_size": len(idx), "tuning_digest": tensor_digest(idx)}
    data = {
        "record": record_label(record, folder), "image": out.name, "points": len(ts),
        "interpolation": "theta(t) = (1 - t) * theta_backdoored + t * theta_purified over floating-point parameters "
                         "and buffers; integer buffers (BatchNorm num_batches_tracked) keep the backdoored value",
        "batchnorm": {"layers": bn_layers, "recomputed": bool(args.bn_recompute and bn_layers),
                      "how": "at every t: running statistics reset, then one pass without gradient over the "
                             "purification's clean tuning images (evaluation transform), BatchNorm layers in train "
                             "mode and the rest in eval mode, cumulative average over batches"
                      if args.bn_recompute else "not recomputed: the interpolation of both models' statistics",
                      "batch_size": args.bn_batch_size},
        "losses": "clean_loss: cross-entropy on the clean test set; backdoor_loss: cross-entropy of the backdoor test "
                  "set against the backdoor labels",
        "definitions": DEFINITIONS,
        "reference": {"note": "the endpoint models with their own BatchNorm statistics (not recomputed)", **reference},
        "paths": paths,
    }
    _draw(Figure, data, record, out)
    json_path = out.with_suffix(".json")
    write_json(json_path, data)
    return out, json_path, data


def _draw(Figure, data: dict, record: dict, out: Path) -> None:
    fig = Figure(figsize=(16, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for mode, path in data["paths"].items():
        ts = path["t"]
        line = axes[0].plot(ts, [100 * v for v in path["clean_acc"]], marker="o", markersize=3, label=path["label"])[0]
        colour = line.get_color()
        axes[1].plot(ts, [100 * v for v in path["asr"]], marker="o", markersize=3, color=colour,
                     label=f"{path['label']} (barrier {100 * path['asr_barrier']:.1f})")
        axes[2].plot(ts, path["clean_loss"], marker="o", markersize=3, color=colour, label=f"{path['label']} clean")
        axes[2].plot(ts, path["backdoor_loss"], marker="x", markersize=3, color=colour, linestyle="--",
                     label=f"{path['label']} backdoor")
    for ax, title, unit in zip(axes, ("C-Acc", "ASR", "loss (solid: clean, dashed: backdoor)"), ("%", "%", "cross-entropy")):
        ax.set_title(title)
        ax.set_xlabel("t (0: backdoored, 1: purified)")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        if ax is not axes[2]:
            ax.set_ylim(-3, 103)
        ax.legend(fontsize=7)
    bn = " (BatchNorm statistics recomputed on the tuning set at each t)" if data["batchnorm"]["recomputed"] else ""
    fig.suptitle(f"{_record_title(record['dataset'], record['model_name'], record['attack'], record['pratio'])}: "
                 f"linear mode connectivity{bn}")
    _save(fig, out)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    png, json_path, _ = run_lmc(args)
    for path in (png, json_path):
        print(f"wrote {path}")
    return [png, json_path]
