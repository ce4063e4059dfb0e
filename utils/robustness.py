"""What the post-purification robustness tools (`ft_poison.py`, `qra.py`) share: the record options,
finding the model under test (a purified model under `defense/<type>/`, the record's own backdoored
model, or a retuned one), and finding a clean reference model among the records.

Layout of their outputs (every folder holds result.json, metrics.csv and config.yaml):

    <record>/defense/<type>/              a purification (ft.py), with model.pt
    <record>/defense/<type>/retune[_tag]/ the retuning attack on it (ft_poison.py), with model.pt
    <record>/retune[_tag]/                the retuning attack on the unpurified model (--defense_type none)
    <source>/qra[_tag]/                   the query-based reactivation attack on a source (qra.py)

A purification redone with `--overwrite true` replaces its folder and with it every attack result
computed on the old weights.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import models
from utils import engine
from utils.attacks import get_attack
from utils.config import parse_bool
from utils.datasets import DATASETS, dataset_info
from utils.errors import UserError
from utils.poison import check_pratio
from utils.record import RECORD_FILE, find_record, load_record, load_state_dict_checked, load_torch_file, record_name
from utils.victim import build_model_for

NONE = "none"  # --defense_type of the unpurified (backdoored, or clean for a pratio-0 record) model


def add_record_options(p: argparse.ArgumentParser) -> None:
    """The flags that name a record, as ft.py spells them."""
    a = p.add_argument
    a("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)} (default cifar10)")
    a("--dataset_path", default="data", help="folder holding the datasets (default data)")
    a("--attack", default="badnet", help="attack name of the record (default badnet)")
    a("--pratio", type=float, default=0.1, help="poisoning ratio of the record (default 0.1; 0 for the clean model)")
    a("--attack_target", type=int, default=0, help="target label of the record (default 0)")
    a("--model", default="resnet18", help="architecture of the record (default resnet18)")
    a("--record_root", default="record", help="folder that holds the records (default record)")


def add_run_options(p: argparse.ArgumentParser, tag_help: str, overwrite_help: str) -> None:
    """The flags every purification and attack-on-a-purification tool shares: output naming and
    replacement, device, precision, evaluation batch and progress bars."""
    a = p.add_argument
    a("--tag", default="", help=tag_help)
    a("--overwrite", type=parse_bool, default=False, help=overwrite_help)
    a("--device", default="cuda:0", help="cuda:N, cpu or auto; CUDA missing falls back to the CPU (default cuda:0)")
    a("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"), help="mixed precision (default auto)")
    a("--eval_batch_size", type=int, default=0, help="evaluation batch size (default 0: 1024 on GPU, 256 on CPU)")
    a("--progress", type=parse_bool, default=True, help="show progress bars")


def check_record_args(args: argparse.Namespace) -> None:
    """Names that would otherwise surface as a confusing "no record" error: dataset, model,
    attack; and the pratio's range."""
    if args.dataset not in DATASETS:
        raise UserError(f"unknown --dataset {args.dataset!r}; choose one of: {', '.join(DATASETS)}")
    if args.model not in models.model_names():
        raise UserError(f"unknown --model {args.model!r}; choose one of: {', '.join(models.model_names())}")
    get_attack(args.attack)  # an unknown attack name is a typo, not a missing record
    check_pratio(args.pratio)


def check_tag(tag: str, flag: str = "--tag") -> None:
    if tag and not all(c.isalnum() or c in "-_." for c in tag):
        raise UserError(f"{flag} {tag!r} may hold only letters, digits, '-', '_' and '.'")


def tagged(name: str, tag: str) -> str:
    return f"{name}_{tag}" if tag else name


def source_folder(record_folder: Path, defense_type: str) -> Path:
    """The folder of the model under test: the record itself for `none`, else defense/<type>/."""
    if defense_type == NONE:
        return Path(record_folder)
    if not defense_type or "/" in defense_type or defense_type.startswith("."):
        raise UserError(f"--defense_type {defense_type!r} is not a folder name under defense/")
    return Path(record_folder) / "defense" / defense_type


def available_defenses(record_folder: Path) -> list[str]:
    """Every defense/<type>/ of a record that holds saved weights."""
    root = Path(record_folder) / "defense"
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob("*/model.pt") if not p.parent.name.startswith("."))


def load_source_state(record: dict, record_folder: Path, defense_type: str) -> dict[str, torch.Tensor]:
    """The weights of the model under test (a clear error when a purification kept none)."""
    if defense_type == NONE:
        return record["model"]
    folder = source_folder(record_folder, defense_type)
    path = folder / "model.pt"
    if not path.is_file():
        have = available_defenses(record_folder)
        if (folder / "result.json").is_file():
            raise UserError(f"{folder} holds no model.pt (purified with --save false); rerun "
                            f"fine_tune/ft.py --ft_mode <mode> --save true --overwrite true")
        raise UserError(f"no purified model at {path}; defenses with weights in this record: "
                        f"{', '.join(have) if have else 'none'} (or --defense_type none for the unpurified model)")
    return load_torch_file(path, "purified model")


def build_loaded_model(record: dict, state: dict, source: str, pipeline: engine.Pipeline, device: torch.device) -> nn.Module:
    """A model of the record's architecture holding `state`, on the device, in eval mode."""
    model = build_model_for(record["model_name"], dataset_info(record["dataset"]), pipeline.input_size)
    load_state_dict_checked(model, state, source)
    return engine.place_model(model, pipeline, device).eval()


def find_clean_record(root: str | Path, dataset: str, model: str, attack: str, target: int,
                      explicit: str | None = None) -> Path:
    """A clean reference model: `explicit` when given (a record folder), else the pratio-0 record of
    the same dataset and architecture, preferring the same attack and target (their backdoor test
    set is then the same), then any attack."""
    if explicit:
        folder = Path(explicit)
        if not (folder / RECORD_FILE).is_file():
            raise UserError(f"--clean_record {folder} holds no {RECORD_FILE}")
        rec = load_record(folder)
        if rec["dataset"] != dataset or rec["model_name"] != model:
            raise UserError(f"--clean_record {folder} is a {rec['dataset']}/{rec['model_name']} record, "
                            f"not {dataset}/{model}")
        return folder
    try:
        return find_record(root, dataset, attack, 0.0, target, model)
    except UserError:
        pass
    name = record_name(0.0, target, model)
    others = sorted(Path(root).glob(f"{dataset}/*/{name}/{RECORD_FILE}"))
    if others:
        return others[0].parent
    raise UserError(f"no clean reference model: no record {Path(root) / dataset / '*' / name}; train one with "
                    f"`python attack/{attack}.py ... --pratio 0`, or pass --clean_record <record folder>")
