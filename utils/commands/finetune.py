"""`fine_tune/ft.py`: load a record, purify its model with one or more modes, write results."""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
import time
from pathlib import Path
from typing import Sequence

import models
from utils import engine
from utils.config import Option, dotted_name, non_negative, parse_bool, parse_optional_float, positive, seed, within
from utils.attacks.poison import LABEL_TRANS
from utils.defenses.purify import (ALL_MODES, DATASET_DEFAULTS, MODES, NORM_PROJ, SCHEDULES, PoisonedSamples, PurifySettings, der,
                                   parse_modes, purify, tuning_indices)
from utils.record.resources import tensor_digest
from utils.commands.driver import aborting, check_record_args, check_record_matches, check_tag, finish_run, parse_record_command, record_label, record_options, run_arguments, run_options, stage, start_runtime
from utils.record.store import load_record, load_state_dict_checked, write_bytes
from utils.record.layout import RECORD_FILE, defense_folder, find_record
from utils.defenses.bti import BTISettings
from utils.data.datasets import dataset_info
from utils.victim.experiment import build_model_for
from utils.engine.runtime import device_name
from utils.errors import UserError
from utils.defenses.purify import mode_options


DESCRIPTION = ("Purify a backdoored model by fine-tuning (FST and baselines, FT-SAM, BTI, PAM).")


def _per_dataset(column: int) -> str:
    """'cifar10 10, gtsrb 15, ...' from DATASET_DEFAULTS (split_ratio, lr, epochs, alpha), so that
    help never lists fewer data sets than the table holds."""
    return ", ".join(f"{name} {values[column]:g}" for name, values in DATASET_DEFAULTS.items())


def options() -> list[Option]:
    """Every setting of the command (flags, and keys of a --yaml_path file)."""
    return [
        *record_options(),
        *run_options("write to defense/<mode>_<tag>/ instead of defense/<mode>/ (for sweeps)",
                     "replace an existing result of the same mode and tag"),
        Option("ft_mode", str, 'fst', f"one of {', '.join(ALL_MODES)}; all (= {', '.join(MODES)}); or a comma-separated list (default fst)"),
        Option("attack_label_trans", str, None, 'checked against the record when given (default: not checked)', choices=LABEL_TRANS),
        Option("epochs", int, None, f'tuning epochs (default per dataset: {_per_dataset(2)}; bti/pam: 30 per round)', check=positive),
        Option("batch_size", int, None, 'tuning batch size (default 128; ft-sam backdoorbench preset 256)', check=positive),
        Option("wd", float, None, 'weight decay of the tuning optimiser (default 0; ft-sam backdoorbench preset 5e-4)', check=non_negative),
        Option("lr", float, None, f'tuning learning rate (default per dataset: {_per_dataset(1)}; bti 1e-4, pam 0.01)', check=positive),
        Option("lr_schedule", str, None, "per-epoch learning-rate schedule: cosine over the epochs, constant, or plateau "
               "(ReduceLROnPlateau on the epoch's mean training loss, as BackdoorBench's Tiny-ImageNet configs), for the modes "
               "that fine-tune (default: each phase's own: cosine; constant for bti, pam and both NAD phases; plateau for fp "
               "and nc on tiny)", choices=SCHEDULES),
        Option("momentum", float, None, 'SGD momentum (default 0.9; bti/pam 0.1)', check=within(0, 1, high_open=True)),
        Option("random_seed", int, 0, 'seed of the tuning subset, head init and batch order (default 0)', check=seed),
        Option("split_ratio", float, None, f'fraction of the clean training set used for tuning (default per dataset: {_per_dataset(0)}; bti/pam 0.05)', check=within(0, 1, low_open=True)),
        Option("eval_every", int, 1, 'evaluate C-Acc/ASR/RA after every k-th tuning epoch and the last (default 1; sweeps on a CPU use a larger k, the skipped epochs are empty in metrics.csv)', check=positive),
        Option("log", parse_bool, False, 'also write the console output to defense/<mode>/log.txt (default false)', flag="optional"),
        Option("pre", parse_bool, False, 'accepted for compatibility: the record already holds the (pre-trained) weights (default false)', flag="optional"),
        Option("save", parse_bool, True, 'save the purified weights as defense/<mode>/model.pt (default true; the retuning and reactivation attacks need them)', flag="optional"),
        Option("linear_name", str, None, "dotted path of the classifier head (default: the model's own, e.g. linear, classifier.6)", check=dotted_name),
        Option("lb_smooth", parse_optional_float, None, 'label smoothing for the CE term (FST term kept; default none, ft-sam 0.1)', check=within(0, 1, high_open=True)),
        Option("alpha", float, None, f'FST feature-shift weight (default per dataset: {_per_dataset(3)})', check=non_negative),
        Option("norm_proj", str, 'all', "rescale the head to the backdoored head's norm after each step: in all five FST modes (official code), fst only (paper), none (default all)", choices=NORM_PROJ),
        Option("split_mode", str, 'uniform', 'uniform random tuning subset, or the first k images of each class (default uniform)', choices=('uniform', 'balanced')),
        Option("frozen_bn", parse_bool, False, 'keep BatchNorm of frozen parts in eval mode (default false: train mode, as the official code)'),
        *mode_options(),
    ]


def parse_args(argv=None) -> argparse.Namespace:
    return parse_record_command(options(), argv, DESCRIPTION)


_TUNING_KEYS = ("split_ratio", "epochs", "lr", "alpha", "momentum", "lb_smooth", "batch_size", "wd", "batch_cosine_tmax",
                "lr_schedule")


def _backdoorbench_ft_sam(num_classes: int) -> dict:
    """BackdoorBench's config/defense/ft-sam/cifar10.yaml and defense/ft-sam.py. Its smoothed
    target gives 1 - eps to the true class and eps / (C - 1) to each other one; torch's
    label_smoothing s gives 1 - s + s / C and s / C, the same targets for s = eps C / (C - 1)."""
    eps = 0.1
    return {"split_ratio": 0.05, "epochs": 100, "batch_size": 256, "lr": 0.01, "momentum": 0.9, "wd": 5e-4,
            "lb_smooth": eps * num_classes / (num_classes - 1), "batch_cosine_tmax": 100}


def _settle_args(args: argparse.Namespace) -> list[str]:
    """Check every value given before any work starts. Returns the modes; `mode_args` fills the
    defaults of each."""
    check_record_args(args)
    modes = parse_modes(args.ft_mode)
    check_tag(args.tag)
    return modes


def mode_args(args: argparse.Namespace, mode: str) -> argparse.Namespace:
    """The arguments of one mode: what the user gave, else the mode's own default (PAM's 5% split,
    FT-SAM's label smoothing, ...), else the dataset's."""
    out = copy.copy(args)
    out.ft_mode = mode
    given = {k: getattr(args, k, None) for k in _TUNING_KEYS}  # batch_cosine_tmax has no flag
    split, lr, epochs, alpha = DATASET_DEFAULTS[args.dataset]
    filled = {"split_ratio": split, "lr": lr, "epochs": epochs, "alpha": alpha, "momentum": 0.9, "lb_smooth": None,
              "batch_size": 128, "wd": 0.0, "batch_cosine_tmax": 0, "lr_schedule": None}
    filled.update(dict(ALL_MODES[mode].defaults))
    if mode == "ft-sam" and args.ft_sam_preset == "backdoorbench":
        filled.update(_backdoorbench_ft_sam(dataset_info(args.dataset).num_classes))
    filled.update(dict(dict(ALL_MODES[mode].dataset_defaults).get(args.dataset, ())))
    for key in _TUNING_KEYS:
        setattr(out, key, given[key] if given[key] is not None else filled[key])
    for option in ALL_MODES[mode].options:  # a mode's own option with a per-dataset default has default None
        if getattr(out, option.name, None) is None and option.name in filled:
            setattr(out, option.name, filled[option.name])
    return out


def ignored_settings(args: argparse.Namespace, mode: str) -> list[str]:
    """The shared settings given (by flag or YAML) that `mode` does not read: those its algorithm
    declares in `Mode.ignores`, and the FST feature-shift weight for every mode without that term."""
    m = ALL_MODES[mode]
    keys = [k for k in _TUNING_KEYS if k in m.ignores] + ([] if m.feature_shift else ["alpha"])
    return [k for k in keys if getattr(args, k, None) is not None]


def settings_for(args: argparse.Namespace, shared: dict | None = None) -> PurifySettings:
    """PurifySettings from one mode's settled arguments; `shared` is passed on so that the modes of
    one run reuse one pre-trained BTI generator."""
    bti = None
    if ALL_MODES[args.ft_mode].unlearn:

        bti = BTISettings(pretrain_epochs=args.bti_pretrain_epochs, mask_epochs=args.bti_mask_epochs,
                          gen_epochs=args.bti_gen_epochs, norm_bound=args.bti_norm_bound,
                          feat_bound=args.bti_feat_bound, unet_width=args.bti_unet_width,
                          generator_rounds=args.bti_generator_rounds, batch_size=args.batch_size,
                          seed=args.random_seed, progress=args.progress)
    return PurifySettings(epochs=args.epochs, lr=args.lr, alpha=args.alpha, batch_size=args.batch_size,
                          momentum=args.momentum, weight_decay=args.wd, batch_cosine_tmax=args.batch_cosine_tmax,
                          schedule=args.lr_schedule or "",
                          label_smoothing=args.lb_smooth or 0.0, norm_proj=args.norm_proj,
                          frozen_bn_eval=args.frozen_bn, seed=args.random_seed, linear_name=args.linear_name,
                          progress=args.progress, sam_rho=args.sam_rho, sam_adaptive=args.sam_adaptive,
                          pam_rho=args.pam_rho, rounds=args.rounds, unlearn_ratio=args.unlearn_ratio, bti=bti,
                          eval_every=args.eval_every, shared=shared,
                          extra={o.name: getattr(args, o.name) for o in ALL_MODES[args.ft_mode].options})


def tuning_set(labels, args: argparse.Namespace):
    """The tuning indices a purification with these (settled) arguments used; RA draws the same."""
    return tuning_indices(labels, args.split_ratio, args.random_seed, args.split_mode == "balanced")


def format_table(before: dict, results: dict[str, dict]) -> str:
    """Mode x (C-Acc, ASR, RA) before and after, in percent, plus DER."""
    head = f"{'mode':<10} {'C-Acc':>7} {'ASR':>7} {'RA':>7}   {'C-Acc':>7} {'ASR':>7} {'RA':>7} {'DER':>6}"
    lines = [f"{'':<10} {'before purification':^23}   {'after purification':^30}", head, "-" * len(head)]
    pct = lambda v: f"{100 * v:7.2f}"  # noqa: E731
    for mode, after in results.items():
        lines.append(f"{mode:<10} {pct(before['clean_acc'])} {pct(before['asr'])} {pct(before['ra'])}   "
                     f"{pct(after['clean_acc'])} {pct(after['asr'])} {pct(after['ra'])} {100 * der(before, after):6.2f}")
    return "\n".join(lines)


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    modes = _settle_args(args)
    folder = find_record(args.record_root, args.dataset, args.attack, args.pratio, args.attack_target, args.model)
    staged = stage({m: defense_folder(folder, m, args.tag) for m in modes}, args.overwrite, "result")
    with aborting(staged.values()):
        return _run(args, modes, folder, staged)


def _run(args, modes, folder, staged) -> dict[str, dict]:
    """Load the record's model, evaluate it, purify it once per mode, print the table."""
    record = load_record(folder)
    check_record_matches(record, args, folder)
    rt = start_runtime(args, record)
    model = build_model_for(record["model_name"], rt.exp.info, rt.exp.pipeline.input_size)
    load_state_dict_checked(model, record["model"], str(folder / RECORD_FILE))
    models.get_head(model, args.linear_name)  # fail early on a bad --linear_name
    model = engine.place_model(model, rt.exp.pipeline, rt.device)
    before = rt.evaluate(model)
    print(f"record {folder}: {record['attack']} on {record['dataset']}/{record['model_name']}, pratio {record['pratio']}; "
          f"device {device_name(rt.device)}")
    print(f"before purification: C-Acc {before['clean_acc']:.4f}  ASR {before['asr']:.4f}  RA {before['ra']:.4f}", flush=True)
    results: dict[str, dict] = {}
    shared: dict = {}  # what the modes of one run share (the pre-trained BTI-DBF generator)
    for name in modes:
        results[name] = _purify_mode(name, args, rt, model, before, shared, record, folder, staged[name])
    print()
    print(format_table(before, results))
    return results


def _purify_mode(name: str, args, rt, model, before: dict, shared: dict, record: dict, folder: Path, staged) -> dict:
    """One mode: its tuning set, the purification (console output optionally kept as a log), its
    result folder. Returns C-Acc/ASR/RA after purification."""
    margs = mode_args(args, name)
    exp = rt.exp
    tune_idx = tuning_set(exp.clean_train.labels, margs)
    tune_images = exp.clean_train.images[tune_idx].to(rt.device)
    tune_labels = exp.clean_train.labels[tune_idx].to(rt.device)
    for key in ignored_settings(args, name):
        print(f"warning: --ft_mode {name} does not use --{key}; it is ignored for this mode", file=sys.stderr, flush=True)
    plan = ALL_MODES[name].plan
    print(f"[{name}] tuning on {len(tune_idx)} clean images ({margs.split_mode}, split_ratio {margs.split_ratio}), "
          + (plan(margs) if plan else f"{margs.epochs} epochs" + (f" x {margs.rounds} rounds" if ALL_MODES[name].unlearn else "")
             + f", lr {margs.lr}, momentum {margs.momentum}"), flush=True)
    log = io.StringIO()
    tee = _Tee(sys.stdout, log) if args.log else sys.stdout
    start = time.perf_counter()
    info: dict = {}
    poisoned = poisoned_samples(exp, record, rt.device) if ALL_MODES[name].needs_poisoned else None
    with contextlib.redirect_stdout(tee):
        purified, rows = purify(model, ALL_MODES[name], tune_images, tune_labels, exp.pipeline, settings_for(margs, shared),
                                rt.evaluate, rt.amp, info, poisoned)
        _print_progress(name, info, rows)
    after = {k: rows[-1][k] for k in ("clean_acc", "asr", "ra")} if rows else before
    for file_name, data in info.get("artifacts", {}).items():  # e.g. NC's reversed triggers
        if Path(file_name).name != file_name or file_name.startswith("."):
            raise ValueError(f"{name}: artifact name {file_name!r} is not a plain file name")
        write_bytes(staged.stage / file_name, data)
    final = finish_run(staged, {
        "ft_mode": name, "record": record_label(record, folder),
        "before": before, "after": after, "der": der(before, after),
        "tuning_size": len(tune_idx), "tuning_digest": tensor_digest(tune_idx),
        **({"inversion": info["rounds"]} if "rounds" in info else {}),
        **info.get("result", {}),
        "seconds": round(time.perf_counter() - start, 2), "device": device_name(rt.device),
    }, rows, run_arguments(margs, dataset_path=exp.dataset_path), weights=purified.state_dict() if args.save else None,
        log=log.getvalue() if args.log else None)
    print(f"{name}: C-Acc {after['clean_acc']:.4f}  ASR {after['asr']:.4f}  RA {after['ra']:.4f}  "
          f"DER {der(before, after):.4f}  -> {final}", flush=True)
    return after


def poisoned_samples(exp, record: dict, device) -> PoisonedSamples:
    """The record's poisoned training images (trigger applied as in training) with their true labels.
    Attacks that poison inside each training batch (WaNet, Input-aware, ...) keep no poisoned images."""
    if record.get("batch_poisoning") or not len(exp.poison_indices):
        raise UserError(f"the {record['attack']} record keeps no poisoned training images "
                        f"({'poisoned inside each training batch' if record.get('batch_poisoning') else 'pratio 0'})")
    idx = exp.poison_indices.to(exp.train.images.device)
    return PoisonedSamples(exp.train.images[idx].to(device), exp.train.true_labels[idx].to(device))


def _print_progress(name: str, info: dict, rows: list[dict]) -> None:
    for found in info.get("rounds", []):
        print(f"[{name}] round {found['round']}: trigger inversion points to label {found['detected_target']} "
              f"({100 * found['target_share']:.1f}% of the synthesised images"
              + ("" if found["generator_trained"] else "; generator not retrained") + ")")
    for row in rows:
        print(f"[{name}] epoch {row['epoch']:2d}  lr {row['lr']:.4g}  loss {row['train_loss']:.4f}  "
              f"C-Acc {row['clean_acc']:.4f}  ASR {row['asr']:.4f}  RA {row['ra']:.4f}")
