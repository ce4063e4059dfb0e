"""`fine_tune/ft_poison.py`: the retuning attack (RA).

A purified model is fine-tuned on a small clean split of the training set with `--poison_num` of
its samples replaced by real poisoned training samples labelled as the backdoor target: SGD, lr
0.01, momentum 0.9, no schedule, 5 epochs. A superficially purified model regains its backdoor; a
clean model (the pratio-0 record) does not, and the unpurified model (`--defense_type none`) gives
the other reference.

The retuning set is by default the same for every model of a record (`--ra_split shared`, as the
official ft_poison.py: a 2% uniform split drawn with seed 42, whatever split the defense tuned on),
so that a defense with a larger tuning split (PAM's 5%) does not face a weaker attack. `--ra_split
defense` reuses each purification's own subset instead (recomputed from its stored split ratio,
seed and mode, and checked against its digest).

As officially, the clean samples are augmented (crop, flip where the dataset flips) and the poisoned
ones only normalised: augmenting a BadNet image would move or cut its patch. The official code draws
the clean samples' augmentation once, when it builds the set, and keeps it for every epoch
(`--augment once`); `epoch` draws it afresh each epoch, `all` also augments the poisoned samples.

The poisoned samples are the record's own: images of its poisoned training set at its poisoned
indices. A record without them (a clean pratio-0 record, or an attack that poisons inside each batch
such as WaNet and Input-aware) gets them made the same way the attack made its training samples:
its training trigger applied to training images of eligible classes, relabelled as the attack does.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import torch

from utils import engine
from utils.attacks.registry import get_attack, make_trigger
from utils.config import Option, folder_names, non_negative, parse_bool, positive, seed, within
from utils.errors import UserError
from utils.attacks.poison import backdoor_labels, check_pratio
from utils.defenses.purify import DATASET_DEFAULTS
from utils.record.layout import NONE, RESULT_FILE, available_defenses, retune_folder, source_folder
from utils.record.resources import tensor_digest
from utils.commands.driver import build_loaded_model, check_tag, load_source_state, parse_record_command, record_options, run_options
from utils.victim.experiment import Experiment
from utils.engine.runtime import device_name
from utils.commands.driver import aborting, finish_run, open_record, record_label, run_arguments, stage, start_runtime
from utils.commands.finetune import tuning_set


DESCRIPTION = ("Retuning attack: fine-tune a purified model on a small clean split with a "
                                            "few poisoned samples and measure whether the backdoor returns.")


def options() -> list[Option]:
    """Every setting of the command (flags, and keys of a --yaml_path file)."""
    return [
        *record_options(),
        Option("defense_type", str, 'fst', "which model: a folder under defense/ (fst, ft, pam, fst_<tag>, ...), none (the record's unpurified model), a comma-separated list, or all (every purified model with weights, and none) (default fst)", check=folder_names),
        Option("poison_num", int, 5, 'tuning samples replaced by poisoned training samples (default 5)', check=non_negative),
        Option("epochs", int, 5, 'retuning epochs (default 5)', check=positive),
        Option("lr", float, 0.01, 'learning rate, constant (default 0.01)', check=positive),
        Option("momentum", float, 0.9, 'SGD momentum (default 0.9)', check=within(0, 1, high_open=True)),
        Option("batch_size", int, 128, 'batch size (default 128)', check=positive),
        Option("ra_split", str, 'shared', "shared: one retuning split for every model of the record (--split_ratio, --random_seed), as the official code; defense: each purification's own tuning subset (default shared)", choices=RA_SPLITS),
        Option("augment", str, 'once', 'once: the clean samples cropped/flipped once and kept so for every epoch, poisoned ones only normalised (official); epoch: clean ones augmented afresh each epoch; all: every sample, poisoned included, each epoch (default once)', choices=AUGMENT_MODES),
        Option("random_seed", int, None, "seed of the split, the poisoned-sample choice, the batch order and the augmentation (default: 42 with --ra_split shared; with defense, the purification's seed, 0 for none)", check=seed),
        Option("split_ratio", float, None, f"fraction of the clean training set retuned on (default {SHARED_SPLIT_RATIO} with --ra_split shared; with defense only for --defense_type none, default the dataset's)", check=within(0, 1, low_open=True)),
        Option("split_mode", str, None, 'how the split is drawn (default uniform; with --ra_split defense only for --defense_type none)', choices=('uniform', 'balanced')),
        Option("save", parse_bool, True, 'save the retuned weights as model.pt (default true; qra.py needs them)', flag="optional"),
        *run_options("write to retune_<tag>/ instead of retune/", "replace an existing retuning result of the same tag"),
    ]


def parse_args(argv=None) -> argparse.Namespace:
    return parse_record_command(options(), argv, DESCRIPTION)


RA_SPLITS = ("shared", "defense")
AUGMENT_MODES = ("once", "epoch", "all")
SHARED_SPLIT_RATIO = 0.02  # the official ft_poison.py defaults, whatever the dataset
SHARED_SEED = 42


def _check_args(args: argparse.Namespace) -> None:
    check_pratio(args.pratio)
    check_tag(args.tag)


def defense_types(text: str, record_folder: Path) -> list[str]:
    if text == "all":
        return available_defenses(record_folder) + [NONE]
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UserError("--defense_type is empty")
    return list(dict.fromkeys(names))


def tuning_plan(args: argparse.Namespace, record_folder: Path, defense_type: str) -> dict:
    """Source, split ratio, seed and mode of the clean split retuned on (and the digest to check it
    against): with `--ra_split shared` the flags (or the official defaults) for every model; with
    `defense` the purification's own for a purified model, the flags (or defaults) for `none`."""
    if args.ra_split == "shared":
        return {"source": "shared",
                "split_ratio": SHARED_SPLIT_RATIO if args.split_ratio is None else args.split_ratio,
                "random_seed": SHARED_SEED if args.random_seed is None else args.random_seed,
                "split_mode": args.split_mode or "uniform", "digest": None}
    if defense_type == NONE:
        split = args.split_ratio if args.split_ratio is not None else DATASET_DEFAULTS[args.dataset][0]
        return {"source": "defense", "split_ratio": split, "random_seed": 0 if args.random_seed is None else args.random_seed,
                "split_mode": args.split_mode or "uniform", "digest": None}
    if args.split_ratio is not None or args.split_mode is not None:
        raise UserError("with --ra_split defense, --split_ratio and --split_mode apply only to --defense_type none: a "
                        "purified model is retuned on the subset its purification used")
    path = source_folder(record_folder, defense_type) / RESULT_FILE
    try:
        result = json.loads(path.read_text())
        used = result["args"]
        plan = {"source": "defense", "split_ratio": float(used["split_ratio"]), "random_seed": int(used["random_seed"]),
                "split_mode": used.get("split_mode", "uniform"), "digest": result.get("tuning_digest")}
    except FileNotFoundError:
        raise UserError(f"{path} does not exist: no purification result for --defense_type {defense_type}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a readable purification result ({type(err).__name__}: {err})") from None
    return plan


def poisoned_samples(exp: Experiment, record: dict, count: int, seed: int) -> dict:
    """`count` poisoned training samples (uint8 images on the device, labels): a seeded choice among
    the record's poisoned training samples, or made with the attack's training trigger when the
    record has too few (see the module docstring)."""
    gen = torch.Generator().manual_seed(engine.derive_seed(seed, "retune-poison"))
    pool = exp.poison_indices.cpu()
    if count == 0:
        empty = exp.train.images[:0]
        return {"images": empty, "labels": exp.train.labels[:0], "train_indices": [], "made": False}
    if len(pool) >= count:
        chosen = pool[torch.randperm(len(pool), generator=gen)[:count]].sort().values
        idx = chosen.to(exp.device)
        return {"images": exp.train.images[idx], "labels": exp.train.labels[idx], "train_indices": chosen.tolist(),
                "made": False}
    spec = get_attack(record["attack"])
    true = exp.train.true_labels.cpu()
    target = record["attack_target"]
    clean = ~exp.train.poison_mask.cpu()
    if spec.clean_label:
        eligible = clean & (true == target)
    elif record["attack_label_trans"] == "all2one":
        eligible = clean & (true != target)
    else:
        eligible = clean
    pool = torch.nonzero(eligible).flatten()
    if len(pool) < count:
        raise UserError(f"--poison_num {count} exceeds the {len(pool)} training images eligible for poisoning")
    chosen = pool[torch.randperm(len(pool), generator=gen)[:count]].sort().values
    idx = chosen.to(exp.device)
    images = make_trigger(spec, exp.trigger_params, True)(exp.train.images[idx])
    labels = exp.train.true_labels[idx]
    if not spec.clean_label:
        labels = backdoor_labels(labels, target, record["attack_label_trans"], exp.info.num_classes)
    return {"images": images, "labels": labels, "train_indices": chosen.tolist(), "made": True}


def retuning_set(exp: Experiment, record: dict, plan: dict, poison_num: int, seed: int) -> dict:
    """The clean split of `plan` with `poison_num` seeded positions replaced by poisoned samples;
    `poisoned` marks them, `set_digest` identifies the whole set (images and labels)."""

    tune_idx = tuning_set(exp.clean_train.labels, argparse.Namespace(**plan))
    digest = tensor_digest(tune_idx)
    if plan["digest"] is not None and plan["digest"] != digest:
        raise UserError("the recomputed tuning subset differs from the one the purification used "
                        f"(digest {digest} vs {plan['digest']}): the dataset on disk changed")
    if poison_num > len(tune_idx):
        raise UserError(f"--poison_num {poison_num} exceeds the tuning subset of {len(tune_idx)} images")
    images = exp.clean_train.images[tune_idx].to(exp.device)
    labels = exp.clean_train.labels[tune_idx].to(exp.device)
    poison = poisoned_samples(exp, record, poison_num, seed)
    gen = torch.Generator().manual_seed(engine.derive_seed(seed, "retune-positions"))
    positions = torch.randperm(len(tune_idx), generator=gen)[:poison_num].sort().values
    pos = positions.to(exp.device)
    images[pos] = poison["images"]
    labels[pos] = poison["labels"]
    poisoned = torch.zeros(len(labels), dtype=torch.bool, device=exp.device)
    poisoned[pos] = True
    set_digest = tensor_digest(torch.cat([images.flatten().long(), labels.long()]))
    return {"images": images, "labels": labels, "poisoned": poisoned, "tuning_indices": tune_idx, "digest": digest,
            "set_digest": set_digest, "positions": positions.tolist(), **{k: poison[k] for k in ("train_indices", "made")}}


def augmented(images: torch.Tensor, poisoned: torch.Tensor, pipeline: engine.Pipeline, gen: torch.Generator) -> torch.Tensor:
    """A copy of the uint8 `images` with the clean ones randomly cropped/flipped and the poisoned ones
    untouched (they take the evaluation transform, as the official RA gives them)."""
    out = images.clone()
    clean = torch.nonzero(~poisoned).flatten()
    if len(clean):
        out[clean] = pipeline.augment(images[clean], gen)
    return out


def retune(model, data: dict, exp: Experiment, args: argparse.Namespace, seed: int, amp, evaluate) -> list[dict]:
    """Plain SGD with a constant learning rate on the retuning set, augmented as `args.augment` says;
    one metrics row per epoch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=0.0)
    gen = engine.make_generator(seed, exp.device, "retune-order")
    mode = args.augment
    images = data["images"]
    if mode == "once":
        images = augmented(images, data["poisoned"], exp.pipeline, gen)
    rows = []
    for epoch in range(1, args.epochs + 1):
        if mode == "epoch":
            images = augmented(data["images"], data["poisoned"], exp.pipeline, gen)
        stats = engine.train_epoch(model, images, data["labels"], exp.pipeline, optimizer, args.batch_size, gen,
                                   amp=amp, desc=f"retune {epoch}/{args.epochs}", augment=mode == "all",
                                   progress=args.progress)
        rows.append({"epoch": epoch, "lr": args.lr, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
                     **evaluate(model)})
    return rows


def format_table(results: dict[str, dict]) -> str:
    head = f"{'model':<16} {'C-Acc':>7} {'ASR':>7} {'RA':>7}   {'C-Acc':>7} {'ASR':>7} {'RA':>7}"
    lines = [f"{'':<16} {'before retuning':^23}   {'after retuning':^23}", head, "-" * len(head)]
    pct = lambda v: f"{100 * v:7.2f}"  # noqa: E731
    for name, r in results.items():
        b, a = r["before"], r["after"]
        lines.append(f"{name:<16} {pct(b['clean_acc'])} {pct(b['asr'])} {pct(b['ra'])}   "
                     f"{pct(a['clean_acc'])} {pct(a['asr'])} {pct(a['ra'])}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    _check_args(args)
    folder, record = open_record(args)
    types = defense_types(args.defense_type, folder)
    # everything that can be checked without training is checked before any work starts
    states = {t: load_source_state(record, folder, t) for t in types}
    plans = {t: tuning_plan(args, folder, t) for t in types}
    staged = stage({t: retune_folder(source_folder(folder, t), args.tag) for t in types}, args.overwrite, "retuning result")
    with aborting(staged.values()):
        return _run(args, record, folder, plans, states, staged)


def _run(args, record, folder, plans, states, staged) -> dict[str, dict]:
    rt = start_runtime(args, record)
    device, amp, exp, evaluate = rt.device, rt.amp, rt.exp, rt.evaluate

    print(f"record {folder}: {record['attack']} on {record['dataset']}/{record['model_name']}, pratio {record['pratio']}; "
          f"device {device_name(device)}", flush=True)
    results = {}
    for name, plan in plans.items():
        seed = plan["random_seed"] if args.random_seed is None else args.random_seed
        source = source_folder(folder, name)
        model = build_loaded_model(record, states[name], str(source), exp.pipeline, device)
        data = retuning_set(exp, record, plan, args.poison_num, seed)
        before = evaluate(model)
        print(f"[{name}] {len(data['tuning_indices'])} tuning images ({plan['source']} split: split_ratio "
              f"{plan['split_ratio']}, seed {plan['random_seed']}, {plan['split_mode']}; set {data['set_digest']}), "
              f"{args.poison_num} replaced by "
              f"{'made' if data['made'] else 'recorded'} poisoned samples; before: C-Acc {before['clean_acc']:.4f}  "
              f"ASR {before['asr']:.4f}", flush=True)
        start = time.perf_counter()
        rows = retune(model, data, exp, args, seed, amp, evaluate)
        after = {k: rows[-1][k] for k in ("clean_acc", "asr", "ra")}
        final = finish_run(staged[name], {
            "attack": "retune", "defense_type": name, "record": record_label(record, folder),
            "before": before, "after": after, "poison_num": args.poison_num, "seed": seed,
            "tuning": {k: plan[k] for k in ("source", "split_ratio", "random_seed", "split_mode")},
            "tuning_size": len(data["tuning_indices"]), "tuning_digest": data["digest"], "ra_set_digest": data["set_digest"],
            "augment": args.augment,
            "replaced_positions": data["positions"], "poison_train_indices": data["train_indices"],
            "poison_made": data["made"], "seconds": round(time.perf_counter() - start, 2), "device": device_name(device),
        }, rows, run_arguments(args, defense_type=name, dataset_path=exp.dataset_path), weights=model.state_dict() if args.save else None)
        results[name] = {"before": before, "after": after}
        print(f"[{name}] after retuning: C-Acc {after['clean_acc']:.4f}  ASR {after['asr']:.4f}  RA {after['ra']:.4f}  "
              f"-> {final}", flush=True)
    print()
    print(format_table(results))
    return results
