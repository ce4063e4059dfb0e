"""What the three commands that act on a record share (`fine_tune/ft.py`, `ft_poison.py`,
`qra.py`): their record flags and checks, opening and checking the record, the runtime (device,
precision, the rebuilt experiment), the model under test, staging the output folders before any
work, and writing a finished run (result, metrics, resolved config, weights). Where each output
goes is `utils.record.layout`'s business (docs/protocol.md §7).
"""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

import models
from utils import engine
from utils.attacks.registry import get_attack
from utils.attacks.registry import ATTACKS
from utils.config import Option, REPO_ROOT, device, dump_yaml, folder_path, non_negative, parse_bool, parse_command, parse_progress, registered, short, tag, within
from utils.data.datasets import DATASETS, dataset_info
from utils.errors import UserError
from utils.attacks.poison import check_pratio
from utils.record.layout import CONFIG_FILE, LOG_FILE, METRICS_FILE, MODEL_FILE, NONE, RECORD_FILE, RESULT_FILE, available_defenses, find_record, record_name, source_folder
from utils.record.store import StagedFolder, clean_state_dict, load_record, load_state_dict_checked, load_torch_file, portable_path, save_torch, write_csv, write_json, write_text
from utils.victim.experiment import Experiment, build_model_for, evaluate_experiment, rebuild_experiment
from utils.engine.runtime import versions



def record_options() -> list[Option]:
    """The options that name a record, as ft.py spells them (a function: the dataset list is read
    when a command starts, so data sets registered by extensions count)."""
    return [
        Option("dataset", str, "cifar10", f"one of {', '.join(DATASETS)} (default cifar10)", check=registered(lambda: DATASETS)),
        Option("dataset_path", str, "data", "folder holding the datasets (default data)", check=folder_path),
        Option("attack", str, "badnet", "attack name of the record (default badnet)", check=registered(lambda: sorted(ATTACKS))),
        Option("pratio", float, 0.1, "poisoning ratio of the record (default 0.1; 0 for the clean model)", check=within(0, 1)),
        Option("attack_target", int, 0, "target label of the record (default 0)", check=non_negative),
        Option("model", str, "resnet18", "architecture of the record (default resnet18)", check=models.name_check()),
        Option("record_root", str, "record", "folder that holds the records (default record)", check=folder_path),
    ]


def run_options(tag_help: str, overwrite_help: str) -> list[Option]:
    """The options every purification and attack-on-a-purification command shares: output naming
    and replacement, device, precision, evaluation batch and progress bars."""
    return [
        Option("tag", str, "", tag_help, check=tag),
        Option("overwrite", parse_bool, False, overwrite_help, yaml=False),
        Option("device", str, "auto", "cuda:N, cpu or auto (a GPU when there is one); CUDA missing falls back to the CPU "
               "with a warning (default auto)", check=device),
        Option("amp", str, "auto", "mixed precision (default auto)", choices=("auto", "bf16", "fp16", "none")),
        Option("eval_batch_size", int, 0, "evaluation batch size (default 0: 1024 on GPU, 256 on CPU)", check=non_negative),
        Option("progress", parse_progress, "auto", "progress bars: true, false or auto (default auto: only when the "
                                                    "output goes to a terminal)"),
    ]


def parse_record_command(options: list[Option], argv, description: str) -> argparse.Namespace:
    """Flags and an optional `--yaml_path` settings file of a record command, resolved."""
    return parse_command(options, argv, description, REPO_ROOT / "fine_tune")


def check_record_args(args: argparse.Namespace) -> None:
    """Names that would otherwise surface as a confusing "no record" error: dataset, model,
    attack; and the pratio's range."""
    if args.dataset not in DATASETS:
        raise UserError(f"unknown --dataset {short(args.dataset)}; choose one of: {', '.join(DATASETS)}")
    if not models.is_model_name(args.model):
        raise UserError(f"unknown --model {short(args.model)}; choose one of: {', '.join(models.model_names())}")
    get_attack(args.attack)  # an unknown attack name is a typo, not a missing record
    check_pratio(args.pratio)


def check_tag(tag: str, flag: str = "--tag") -> None:
    if tag and not all(c.isalnum() or c in "-_." for c in tag):
        raise UserError(f"{flag} {short(tag)} may hold only letters, digits, '-', '_' and '.'")








def load_source_state(record: dict, record_folder: Path, defense_type: str) -> dict[str, torch.Tensor]:
    """The weights of the model under test (a clear error when a purification kept none)."""
    if defense_type == NONE:
        return record["model"]
    folder = source_folder(record_folder, defense_type)
    path = folder / MODEL_FILE
    if not path.is_file():
        have = available_defenses(record_folder)
        if (folder / RESULT_FILE).is_file():
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


# --- one run of a record command -------------------------------------------------------------

def check_record_matches(record: dict, args: argparse.Namespace, folder: Path) -> None:
    """The loaded record is the one the flags describe (a renamed or copied folder is caught here)."""
    pairs = [("dataset", args.dataset), ("model_name", args.model), ("attack", args.attack)]
    if getattr(args, "attack_label_trans", None) is not None:
        pairs.append(("attack_label_trans", args.attack_label_trans))
    for key, wanted in pairs:
        if record[key] != wanted:
            raise UserError(f"{folder}: the record is for {key.replace('_name', '')} {record[key]!r}, not {wanted!r}")


def open_record(args: argparse.Namespace) -> tuple[Path, dict]:
    """The record folder the flags name and its content, checked against the flags."""
    folder = find_record(args.record_root, args.dataset, args.attack, args.pratio, args.attack_target, args.model)
    record = load_record(folder)
    check_record_matches(record, args, folder)
    return folder, record


def record_label(record: dict, folder: Path) -> str:
    """dataset/attack/<record folder name>: how results name their record."""
    return f"{record['dataset']}/{record['attack']}/{Path(folder).name}"


def stage(folders: dict[str, Path], overwrite: bool, what: str) -> dict[str, StagedFolder]:
    """Claim every output folder before any work, so an existing result (without --overwrite) or a
    concurrent run on the same folder stops the command at once, not after training."""
    staged: dict[str, StagedFolder] = {}
    with aborting(staged.values()):
        for key, folder in folders.items():
            staged[key] = StagedFolder(folder, overwrite, what, RESULT_FILE)
    return staged


@contextlib.contextmanager
def aborting(staged: Iterable[StagedFolder]) -> Iterator[None]:
    """Drop the unfinished stages when the body fails or is interrupted."""
    try:
        yield
    except BaseException:
        for s in list(staged):
            s.abort()
        raise


@dataclass
class Runtime:
    """Where a record command computes: the device, the precision and the record's rebuilt experiment."""

    device: torch.device
    amp: torch.dtype | None
    exp: Experiment
    eval_batch_size: int

    def evaluate(self, net: nn.Module) -> dict[str, float]:
        """C-Acc, ASR and RA on the record's test sets."""
        return evaluate_experiment(net, self.exp, self.eval_batch_size, self.amp)


def start_runtime(args: argparse.Namespace, record: dict) -> Runtime:
    engine.configure_threads()
    device = engine.resolve_device(args.device)
    amp = engine.amp_dtype(args.amp, device)
    return Runtime(device, amp, rebuild_experiment(record, args.dataset_path, device), args.eval_batch_size)


PATH_ARGS = ("dataset_path", "record_root", "clean_record", "yaml_path")


def run_arguments(args: argparse.Namespace, **override: Any) -> dict[str, Any]:
    """The resolved flags as saved beside a result, with paths made portable. Callers pass
    `dataset_path=exp.dataset_path`: the folder the data was actually read from (the loader may
    have fallen back to the system copy of Fashion-MNIST), already in its portable form."""
    out = {k: portable_path(v) if k in PATH_ARGS and v else v for k, v in vars(args).items()}
    out.update(override)
    return out


def finish_run(staged: StagedFolder, result: dict, rows: list[dict], arguments: dict, weights: dict | None = None,
               weights_file: str = MODEL_FILE, log: str | None = None) -> Path:
    """Write one finished run into its stage (result, per-epoch metrics, resolved config, optional
    weights and log) and make it the result. Returns the final folder."""
    staged.check_owner()  # a run that lost its folder (its stage may be gone with it) says so, not ENOENT
    write_json(staged.stage / RESULT_FILE, {**result, "versions": versions(), "args": arguments})
    write_csv(staged.stage / METRICS_FILE, rows)
    write_text(staged.stage / CONFIG_FILE, dump_yaml(arguments))
    if weights is not None:
        save_torch(staged.stage / weights_file, clean_state_dict(weights))
    if log is not None:
        write_text(staged.stage / LOG_FILE, log)
    staged.commit()
    return staged.final
