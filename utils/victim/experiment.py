"""A victim experiment: the resolved attack config, the (subset) data on the device, the poisoned
training set and the backdoor test set; built fresh for training or rebuilt from a record."""
from __future__ import annotations

import warnings
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

import models
from utils import attacks, engine
from utils.attacks.poison import (
    LABEL_TRANS,
    BackdoorTestSet,
    PoisonedTrainSet,
    backdoor_test_set,
    check_pratio,
    choose_poison_indices,
    poison_train_set,
)
from utils.config import (
    REPO_ROOT,
    folder_path,
    Option,
    pre_parse,
    build_parser,
    device,
    load_yaml,
    non_negative,
    parse_bool,
    parse_progress,
    positive,
    resolve,
    resolve_path,
    seed,
    short,
    within,
)
from utils.data.datasets import (
    DATASETS,
    DatasetInfo,
    ImageSet,
    dataset_info,
    load_dataset,
)
from utils.errors import UserError
from utils.record.resources import RESOURCE_OPTIONS
from utils.record.store import portable_path


def _known_model(name: str) -> str | None:
    if models.is_model_name(name):
        return None
    problem = models.name_check()(name)
    if problem and problem.startswith("is refused"):  # a tv: name: say why it was refused
        return problem
    return f"is not a registered model; choose one of: {', '.join(models.model_names())}, or tv:<torchvision name>"


COMMON_OPTIONS: list[Option] = [
    Option("dataset", str, "cifar10", "dataset name", choices=DATASETS.keys()),  # a live view: later registrations count
    Option("dataset_path", str, "data", "folder holding the datasets", check=folder_path),
    Option("download", parse_bool, False, "download the dataset with torchvision when missing (needs internet)"),
    Option("model", str, "resnet18", "architecture from the model registry", check=_known_model),
    Option("pretrained", parse_bool, False, "start from ImageNet weights (swin_t only)"),
    Option("input_size", int, 0, "side of the model input; images are resized per batch (0: the dataset's own)",
           check=within(0, engine.MAX_INPUT_SIZE)),
    Option("epochs", int, 100, "training epochs", check=positive),
    Option("batch_size", int, 128, "training batch size", check=positive),
    Option("lr", float, 0.1, "initial learning rate", check=positive),
    Option("sgd_momentum", float, 0.9, "SGD momentum", check=within(0, 1, high_open=True)),
    Option("wd", float, 5e-4, "weight decay", check=non_negative),
    Option("lr_scheduler", str, "cosine", "learning-rate schedule over the run's own epochs", choices=("cosine", "none")),
    Option("random_seed", int, 0, "seed for data selection, poisoning, initialisation and batch order", check=seed),
    Option("device", str, "auto", "cuda:N, cpu or auto (a GPU when there is one); CUDA missing falls back to the CPU "
           "with a warning", check=device),
    Option("amp", str, "auto", "mixed precision", choices=("auto", "bf16", "fp16", "none")),
    Option("pratio", float, 0.1, "poisoning ratio in [0, 1]; 0 trains a clean model", check=within(0, 1)),
    Option("attack_target", int, 0, "target label", check=non_negative),
    Option("attack_label_trans", str, "all2one", "all2one: every poisoned label -> target; all2all: y -> y+1 mod C",
           choices=LABEL_TRANS),
    Option("train_subset", int, 0, "train on this many seeded-random training images (0: all)", check=non_negative),
    Option("test_subset", int, 0, "evaluate on this many seeded-random test images (0: all)", check=non_negative),
    Option("eval_batch_size", int, 0, "batch size for evaluation (0: 1024 on GPU, 256 on CPU)", check=non_negative),
    Option("record_root", str, "record", "folder that holds the records", check=folder_path),
    *RESOURCE_OPTIONS,
    Option("overwrite", parse_bool, False, "replace an existing record", yaml=False),
    Option("progress", parse_progress, "auto", "progress bars: true, false or auto (only on a terminal)"),
]

#: the prototype an attack script uses when no --yaml_path is given, and the small one to suggest
DEFAULT_PROTOTYPE = "../config/attack/prototype/cifar10.yaml"
SMALL_PROTOTYPE = "config/attack/prototype/fmnist.yaml"
# set by parse_attack_config when no --yaml_path was given: appended to a missing-dataset error, so
# that a user who forgot --yaml_path learns why CIFAR-10 was wanted and what runs offline-sized
_missing_data_hint = ""


def attack_options(spec: attacks.AttackSpec) -> list[Option]:
    """The common options and the attack's own; an attack may list a shared option again (e.g.
    `resource_root` through `SURROGATE_OPTIONS`), which then appears once."""
    seen: set[str] = set()
    out = []
    for opt in COMMON_OPTIONS + spec.options:
        if opt.name not in seen:
            seen.add(opt.name)
            out.append(opt)
    return out


def parse_attack_config(attack: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Defaults < prototype YAML (`--yaml_path`) < attack YAML (`--bd_yaml_path`) < flags. The YAML
    files are read first, so that --help shows the defaults they give."""
    global _missing_data_hint
    spec = attacks.get_attack(attack)
    options = attack_options(spec)
    script_dir = REPO_ROOT / "attack"
    yaml_flags = [
        ("yaml_path", DEFAULT_PROTOTYPE, "prototype YAML: dataset and training recipe"),
        ("bd_yaml_path", f"../config/attack/{attack}/default.yaml", "attack YAML: trigger parameters"),
    ]
    pre = pre_parse(argv, yaml_flags)
    proto_path = resolve_path(pre["yaml_path"], script_dir, "prototype YAML")
    attack_path = resolve_path(pre["bd_yaml_path"], script_dir, "attack YAML")
    layers = [(str(proto_path), load_yaml(proto_path, options)), (str(attack_path), load_yaml(attack_path, options))]
    shown = {k: v for _, layer in layers for k, v in layer.items()}
    description = (f"Train a {attack} backdoored model and write a record. Defaults shown as 'default here' come "
                   f"from {portable_path(str(proto_path.resolve()))} and {portable_path(str(attack_path.resolve()))}.")
    args = vars(build_parser(options, description, yaml_flags, shown).parse_args(argv))
    args.pop("yaml_path", None)
    args.pop("bd_yaml_path", None)
    cfg = resolve(options, layers, args)
    _missing_data_hint = ""
    if "yaml_path" not in pre_given(argv):
        _missing_data_hint = (f"no --yaml_path was given, so the CIFAR-10 prototype is used; for a small run "
                              f"use --yaml_path {SMALL_PROTOTYPE}")
        warnings.warn(f"no --yaml_path given: using {DEFAULT_PROTOTYPE.removeprefix('../')} ({cfg['dataset']}, "
                      f"{cfg['model']}, {cfg['epochs']} epochs); --yaml_path {SMALL_PROTOTYPE} is the small CPU-sized "
                      f"recipe", stacklevel=2)
    cfg["attack"] = attack
    cfg["yaml_path"] = portable_path(str(proto_path.resolve()))
    cfg["bd_yaml_path"] = portable_path(str(attack_path.resolve()))
    return cfg


def pre_given(argv: Sequence[str] | None) -> set[str]:
    """Which of the YAML-path flags the command line spells out."""
    given = pre_parse(argv, [("yaml_path", None, ""), ("bd_yaml_path", None, "")])
    return {k for k, v in given.items() if v is not None}


def validate_config(cfg: dict[str, Any]) -> DatasetInfo:
    info = dataset_info(cfg["dataset"])
    check_pratio(cfg["pratio"])
    if not models.is_model_name(cfg["model"]):
        raise UserError(f"unknown model {short(cfg['model'])}; choose one of: {', '.join(models.model_names())}")
    if not 0 <= cfg["attack_target"] < info.num_classes:
        raise UserError(f"attack_target {cfg['attack_target']} is not a class of {info.name} (0..{info.num_classes - 1})")
    for key in ("epochs", "batch_size"):
        if cfg[key] < 1:
            raise UserError(f"{key} must be positive, got {cfg[key]}")
    for key in ("train_subset", "test_subset", "input_size", "eval_batch_size"):
        if cfg[key] < 0:
            raise UserError(f"{key} must be 0 or positive, got {cfg[key]}")
    if cfg["lr"] <= 0:
        raise UserError(f"lr must be positive, got {cfg['lr']}")
    if cfg["pretrained"] and cfg["model"] != "swin_t":
        raise UserError(f"pretrained weights are offered for swin_t only, not {cfg['model']}")
    return info


def subset_indices(n: int, k: int, seed: int) -> torch.Tensor | None:
    """`k` seeded-random indices out of `n` (sorted), or None for 'all'."""
    if k <= 0 or k >= n:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:k].sort().values


def take(data: ImageSet, indices: torch.Tensor | None) -> ImageSet:
    return data if indices is None else ImageSet(data.images[indices], data.labels[indices])


def build_model_for(name: str, info: DatasetInfo, input_size: int, pretrained: bool = False) -> models.BackdoorNet:
    model = models.build_model(name, info.num_classes, info.channels, input_size)
    if pretrained:
        model.load_imagenet_trunk()
    return model


@dataclass
class Experiment:
    """Everything needed to train or evaluate one backdoor setting, already on the device."""

    info: DatasetInfo
    device: torch.device
    pipeline: engine.Pipeline
    train: PoisonedTrainSet
    clean_test: ImageSet
    bd_test: BackdoorTestSet
    poison_indices: torch.Tensor
    train_indices: torch.Tensor | None
    test_indices: torch.Tensor | None
    trigger_params: dict
    clean_train: ImageSet  # the full clean training set, on the CPU (purification draws from it)
    #: the dataset folder as the record should name it: the given `dataset_path` (portable), or the
    #: system copy the loader fell back to (a fixed system location, so kept absolute)
    dataset_path: str = ""


def _to(data, device):
    return type(data)(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(data).items()})


def prepare_experiment(cfg: dict[str, Any], info: DatasetInfo, device: torch.device, trigger_params: dict | None = None,
                       poison_indices: torch.Tensor | None = None, train_indices: torch.Tensor | None = None,
                       test_indices: torch.Tensor | None = None, fresh: bool = True) -> Experiment:
    """Load the data, choose (or take from a record) the poisoned indices and build the poisoned
    training set and the backdoor test set, all as device tensors."""
    spec = attacks.get_attack(cfg["attack"])
    seed = cfg["random_seed"]
    try:
        train_full = load_dataset(info.name, cfg["dataset_path"], train=True, download=cfg.get("download", False))
        test_full = load_dataset(info.name, cfg["dataset_path"], train=False, download=cfg.get("download", False))
    except UserError as err:
        if fresh and _missing_data_hint:
            raise UserError(f"{err}; {_missing_data_hint}") from None
        raise
    if fresh:
        for key, full in (("train_subset", train_full), ("test_subset", test_full)):
            if cfg[key] > len(full):  # said, not silently taken as "all"
                print(f"note: --{key} {cfg[key]} is more than the {len(full)} images of the split; using all of them",
                      file=sys.stderr)
        train_indices = subset_indices(len(train_full), cfg["train_subset"], engine.derive_seed(seed, "train-subset"))
        test_indices = subset_indices(len(test_full), cfg["test_subset"], engine.derive_seed(seed, "test-subset"))
    for name, idx, full in (("train", train_indices, train_full), ("test", test_indices, test_full)):
        if idx is not None and len(idx) and int(idx.max()) >= len(full):
            raise UserError(f"the {name} split on disk has {len(full)} images, fewer than the record expects")
    train = take(train_full, train_indices)
    test = take(test_full, test_indices)
    build_now = trigger_params is None
    if build_now:
        trigger_params = spec.build(cfg, info)
    if poison_indices is None and spec.batch_poisoning:
        poison_indices = torch.empty(0, dtype=torch.long)  # poisoned inside each batch instead
    elif poison_indices is None:
        poison_indices = choose_poison_indices(train.labels, cfg["pratio"], seed, cfg["attack_target"], spec.clean_label)
    elif len(poison_indices) and int(poison_indices.max()) >= len(train):
        raise UserError("the record's poisoned indices do not fit the training set on disk")
    if build_now and spec.prepare is not None:
        ctx = attacks.PrepareContext(cfg, info, train, test, train_indices, poison_indices, trigger_params, device,
                                     engine.amp_dtype(cfg.get("amp", "none"), device), cfg.get("progress", False),
                                     cfg.get("resource_root", "record/resources"))
        # resource steps may draw random numbers (a surrogate's initialisation, ...); a cached
        # resource draws none, so the global stream is restored to keep the victim's own
        # initialisation identical whether the cache was hit or not
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            trigger_params = {**trigger_params, **spec.prepare(ctx)}
    if spec.train_apply is not None:
        params, chosen = trigger_params, poison_indices
        train_trigger = lambda images: spec.train_apply(images, chosen, params)  # noqa: E731
    else:
        train_trigger = attacks.make_trigger(spec, trigger_params, True)
    poisoned = poison_train_set(train.images, train.labels, poison_indices, train_trigger,
                                cfg["attack_target"], cfg["attack_label_trans"], info.num_classes, spec.clean_label)
    bd_test = make_bd_test(spec, trigger_params, test, cfg, info.num_classes)
    pipeline = engine.Pipeline.for_dataset(info, device, cfg.get("input_size") or None)
    given = str(cfg["dataset_path"])
    read_from = train_full.root if train_full.root is not None else Path(given)
    dataset_path = portable_path(given) if read_from == Path(given) else str(read_from)
    return Experiment(info, device, pipeline, _to(poisoned, device), _to(test, device), _to(bd_test, device),
                      poison_indices, train_indices, test_indices, trigger_params, train_full, dataset_path)


def make_bd_test(spec: attacks.AttackSpec, params: dict, test: ImageSet, cfg: dict, num_classes: int) -> BackdoorTestSet:
    """The backdoor test set: the test-time trigger on every eligible clean test image."""
    return backdoor_test_set(test.images, test.labels, attacks.make_trigger(spec, params, False),
                             cfg["attack_target"], cfg["attack_label_trans"], num_classes)


def evaluate_experiment(model, exp: Experiment, batch_size: int, amp) -> dict[str, float]:
    return engine.backdoor_metrics(model, exp.pipeline, exp.clean_test.images, exp.clean_test.labels,
                                   exp.bd_test.images, exp.bd_test.targets, exp.bd_test.true_labels, batch_size, amp)


def refresh_trigger(exp: Experiment, spec: attacks.AttackSpec, cfg: dict, params: dict) -> None:
    """Take a trigger that changed during training (Input-aware) and rebuild the backdoor test set."""
    exp.trigger_params = {**exp.trigger_params, **params}
    test = exp.clean_test
    exp.bd_test = make_bd_test(spec, exp.trigger_params, test, cfg, exp.info.num_classes)


def rebuild_experiment(record: dict[str, Any], dataset_path: str, device: torch.device, download: bool = False) -> Experiment:
    """The poisoned training set and test sets of a record, rebuilt from the dataset on disk and the
    trigger parameters stored in the record."""
    info = dataset_info(record["dataset"])
    if record["image_size"] != info.image_size or record["in_channels"] != info.channels:
        raise UserError(f"record expects {record['in_channels']}x{record['image_size']} px images but dataset "
                        f"{info.name} has {info.channels}x{info.image_size}")
    cfg = {"attack": record["attack"], "random_seed": record["random_seed"], "dataset_path": dataset_path,
           "download": download, "attack_target": record["attack_target"],
           "attack_label_trans": record["attack_label_trans"], "pratio": record["pratio"],
           "input_size": record.get("input_size") or 0}
    return prepare_experiment(cfg, info, device, trigger_params=record["trigger"],
                              poison_indices=record["poison_indices"], train_indices=record.get("train_indices"),
                              test_indices=record.get("test_indices"), fresh=False)
