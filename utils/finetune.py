"""`fine_tune/ft.py`: load a record, purify its model with one mode (or all five), write results."""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path
from typing import Sequence

import models
from utils import engine
from utils.attacks import get_attack
from utils.config import dump_yaml, parse_bool, parse_optional_float
from utils.datasets import DATASETS
from utils.errors import UserError
from utils.poison import LABEL_TRANS, check_pratio
from utils.purify import DATASET_DEFAULTS, MODES, NORM_PROJ, PurifySettings, der, get_mode, purify, tuning_indices
from utils.record import (StagedFolder, clean_state_dict, find_record, load_record, load_state_dict_checked, portable_path, save_torch,
                          write_csv, write_json, write_text)
from utils.victim import build_model_for, device_name, evaluate_experiment, rebuild_experiment, versions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Purify a backdoored model by fine-tuning (FST and baselines).")
    a = p.add_argument
    a("--device", default="cuda:0", help="cuda:N, cpu or auto; CUDA missing falls back to the CPU (default cuda:0)")
    a("--ft_mode", default="fst", help=f"one of {', '.join(MODES)}, or all (default fst)")
    a("--attack", default="badnet", help="attack name of the record (default badnet)")
    a("--attack_label_trans", default=None, choices=LABEL_TRANS, help="checked against the record when given")
    a("--pratio", type=float, default=0.1, help="poisoning ratio of the record (default 0.1)")
    a("--epochs", type=int, default=None, help="tuning epochs (default per dataset: cifar10 10, gtsrb 15, cifar100/tiny 15)")
    a("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)} (default cifar10)")
    a("--dataset_path", default="data", help="folder holding the datasets (default data)")
    a("--attack_target", type=int, default=0, help="target label of the record (default 0)")
    a("--batch_size", type=int, default=128, help="tuning batch size (default 128)")
    a("--lr", type=float, default=None, help="tuning learning rate (default per dataset: 0.01, or 0.001 for cifar100/tiny)")
    a("--random_seed", type=int, default=0, help="seed of the tuning subset, head init and batch order (default 0)")
    a("--model", default="resnet18", help="architecture of the record (default resnet18)")
    a("--split_ratio", type=float, default=None, help="fraction of the clean training set used for tuning (default 0.02, 0.05 for cifar100/tiny)")
    a("--log", action="store_true", help="also write the console output to defense/<mode>/log.txt")
    a("--pre", action="store_true", help="accepted for compatibility: the record already holds the (pre-trained) weights")
    a("--save", action="store_true", help="save the purified weights as defense/<mode>/model.pt")
    a("--linear_name", default=None, help="dotted path of the classifier head (default: the model's own, e.g. linear, classifier.6)")
    a("--lb_smooth", type=parse_optional_float, default=None, help="label smoothing for the CE term (FST term kept)")
    a("--alpha", type=float, default=None, help="FST feature-shift weight (default per dataset: 0.2 cifar10, 0.1 gtsrb, 0.001 cifar100/tiny)")
    a("--norm_proj", default="all", choices=NORM_PROJ, help="rescale the head to the backdoored head's norm after each step: in all modes (official code), fst only (paper), none")
    a("--split_mode", default="uniform", choices=("uniform", "balanced"), help="uniform random tuning subset, or the first k images of each class")
    a("--frozen_bn", type=parse_bool, default=False, help="keep BatchNorm of frozen parts in eval mode (default false: train mode, as the official code)")
    a("--record_root", default="record", help="folder that holds the records (default record)")
    a("--tag", default="", help="write to defense/<mode>_<tag>/ instead of defense/<mode>/ (for sweeps)")
    a("--overwrite", type=parse_bool, default=False, help="replace an existing result of the same mode and tag")
    a("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"), help="mixed precision (default auto)")
    a("--eval_batch_size", type=int, default=0, help="evaluation batch size (default 0: 1024 on GPU, 256 on CPU)")
    a("--progress", type=parse_bool, default=True, help="show progress bars")
    return p


def _settle_args(args: argparse.Namespace) -> list[str]:
    """Fill per-dataset defaults and check every value before any work starts. Returns the modes."""
    if args.dataset not in DATASETS:
        raise UserError(f"unknown --dataset {args.dataset!r}; choose one of: {', '.join(DATASETS)}")
    if args.model not in models.model_names():
        raise UserError(f"unknown --model {args.model!r}; choose one of: {', '.join(models.model_names())}")
    get_attack(args.attack)  # an unknown attack name is a typo, not a missing record
    modes = list(MODES) if args.ft_mode == "all" else [get_mode(args.ft_mode).name]
    check_pratio(args.pratio)
    split, lr, epochs, alpha = DATASET_DEFAULTS[args.dataset]
    args.split_ratio = split if args.split_ratio is None else args.split_ratio
    args.lr = lr if args.lr is None else args.lr
    args.epochs = epochs if args.epochs is None else args.epochs
    args.alpha = alpha if args.alpha is None else args.alpha
    if not 0.0 < args.split_ratio <= 1.0:
        raise UserError(f"--split_ratio must be within (0, 1], got {args.split_ratio}")
    if args.epochs < 1 or args.batch_size < 1 or args.eval_batch_size < 0:
        raise UserError("--epochs and --batch_size must be positive, --eval_batch_size 0 or positive")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.lb_smooth is not None and not 0.0 <= args.lb_smooth < 1.0:
        raise UserError(f"--lb_smooth must be within [0, 1), got {args.lb_smooth}")
    if args.tag and not all(c.isalnum() or c in "-_." for c in args.tag):
        raise UserError(f"--tag {args.tag!r} may hold only letters, digits, '-', '_' and '.'")
    return modes


def _check_record_matches(record: dict, args: argparse.Namespace, folder: Path) -> None:
    pairs = [("dataset", args.dataset), ("model_name", args.model), ("attack", args.attack)]
    if args.attack_label_trans is not None:
        pairs.append(("attack_label_trans", args.attack_label_trans))
    for key, wanted in pairs:
        if record[key] != wanted:
            raise UserError(f"{folder}: the record is for {key.replace('_name', '')} {record[key]!r}, not {wanted!r}")


def output_folder(record_folder: Path, mode: str, tag: str) -> Path:
    return record_folder / "defense" / (f"{mode}_{tag}" if tag else mode)


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
    args = build_parser().parse_args(argv)
    modes = _settle_args(args)
    folder = find_record(args.record_root, args.dataset, args.attack, args.pratio, args.attack_target, args.model)
    # refuse before any work if a result would be overwritten
    staged = {m: StagedFolder(output_folder(folder, m, args.tag), args.overwrite, "result", "result.json") for m in modes}
    try:
        results = _run(args, modes, folder, staged)
    except BaseException:
        for s in staged.values():
            s.abort()
        raise
    return results


def _run(args, modes, folder, staged) -> dict[str, dict]:
    record = load_record(folder)
    _check_record_matches(record, args, folder)
    engine.configure_threads()
    device = engine.resolve_device(args.device)
    amp = engine.amp_dtype(args.amp, device)
    exp = rebuild_experiment(record, args.dataset_path, device)
    model = build_model_for(record["model_name"], exp.info, exp.pipeline.input_size)
    load_state_dict_checked(model, record["model"], str(folder / "attack_result.pt"))
    models.get_head(model, args.linear_name)  # fail early on a bad --linear_name
    model = engine.place_model(model, exp.pipeline, device)
    tune_idx = tuning_indices(exp.clean_train.labels, args.split_ratio, args.random_seed, args.split_mode == "balanced")
    tune_images = exp.clean_train.images[tune_idx].to(device)
    tune_labels = exp.clean_train.labels[tune_idx].to(device)

    def evaluate(net):
        return evaluate_experiment(net, exp, args.eval_batch_size, amp)

    before = evaluate(model)
    print(f"record {folder}: {record['attack']} on {record['dataset']}/{record['model_name']}, pratio {record['pratio']}; "
          f"tuning on {len(tune_idx)} clean images ({args.split_mode}, split_ratio {args.split_ratio}), "
          f"device {device_name(device)}")
    print(f"before purification: C-Acc {before['clean_acc']:.4f}  ASR {before['asr']:.4f}  RA {before['ra']:.4f}", flush=True)
    settings = PurifySettings(epochs=args.epochs, lr=args.lr, alpha=args.alpha, batch_size=args.batch_size,
                              label_smoothing=args.lb_smooth or 0.0, norm_proj=args.norm_proj,
                              frozen_bn_eval=args.frozen_bn, seed=args.random_seed, linear_name=args.linear_name,
                              progress=args.progress)
    results = {}
    for name in modes:
        log = io.StringIO()
        tee = _Tee(sys.stdout, log) if args.log else sys.stdout
        start = time.perf_counter()
        with contextlib.redirect_stdout(tee):
            purified, rows = purify(model, MODES[name], tune_images, tune_labels, exp.pipeline, settings, evaluate, amp)
            for row in rows:
                print(f"[{name}] epoch {row['epoch']:2d}  lr {row['lr']:.4g}  loss {row['train_loss']:.4f}  "
                      f"C-Acc {row['clean_acc']:.4f}  ASR {row['asr']:.4f}  RA {row['ra']:.4f}")
        after = {k: rows[-1][k] for k in ("clean_acc", "asr", "ra")} if rows else before
        seconds = time.perf_counter() - start
        out = staged[name]
        arguments = {k: portable_path(v) if k in ("dataset_path", "record_root") else v for k, v in vars(args).items()}
        arguments["ft_mode"] = name
        write_json(out.stage / "result.json", {
            "ft_mode": name, "record": f"{record['dataset']}/{record['attack']}/{folder.name}",
            "before": before, "after": after, "der": der(before, after),
            "tuning_size": len(tune_idx), "seconds": round(seconds, 2), "device": device_name(device),
            "versions": versions(), "args": arguments,
        })
        write_csv(out.stage / "metrics.csv", rows)
        write_text(out.stage / "config.yaml", dump_yaml(arguments))
        if args.save:
            save_torch(out.stage / "model.pt", clean_state_dict(purified.state_dict()))
        if args.log:
            write_text(out.stage / "log.txt", log.getvalue())
        out.commit()
        results[name] = after
        print(f"{name}: C-Acc {after['clean_acc']:.4f}  ASR {after['asr']:.4f}  RA {after['ra']:.4f}  "
              f"DER {der(before, after):.4f}  -> {out.final}", flush=True)
    print()
    print(format_table(before, results))
    return results
