"""`fine_tune/qra.py`: the query-based reactivation attack (QRA).

A purified model may keep its backdoor dormant: a few poisoned samples retune it back (the retuning
attack, `fine_tune/ft_poison.py`). QRA asks whether the same reactivation can be had by perturbing
inputs alone, without touching the weights. It learns a perturbation generator δ(x) such that

    loss = CE(clean(x + δ(x)), y) + alpha_qra * KL(retuned(x) || purified(x + δ(x)))

on 500 clean and 500 poisoned training images: the purified model on perturbed inputs imitates
the retuned one (so triggered inputs go to the target), while a clean model on perturbed inputs
keeps the true label (so δ is not a universal adversarial perturbation that would fool any model).
A real reactivation shows a high ASR of `x_bd + δ(x_bd)` on the purified model and a low one on
the clean model. All three models are frozen; only the generator learns.

As in the official qra.py, the generator is an MLP on the flattened *normalised* image, D -> 1024 ->
1024 -> 1024 -> D with ReLU between, whose output `eps * tanh(.)` is added in pixel space and
clipped to [0, 1]; and the poisoned samples are the victim's own poisoned training images (those of
non-target classes under all-to-one). A record without enough of them (clean-label attacks, whose
poisoned images all belong to the target class; WaNet and Input-aware, which poison inside each
batch; a low pratio) gets the rest made with the test-time trigger on clean training images.
Besides C-Acc and ASR the report gives the official "clean + δ predicted as the target": the share
of all clean test images that a model labels as the target once δ is added.

Perturbed images stay float (x + δ clipped to [0, 1], not rounded back to uint8), as in the paper.
"""
from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from utils import engine
from utils.attacks.registry import get_attack, make_trigger
from utils.data.datasets import ImageSet
from utils.errors import UserError
from utils.attacks.poison import PoisonedTrainSet, backdoor_labels, backdoor_test_set
from utils.record.layout import GENERATOR_FILE, MODEL_FILE, NONE, RECORD_FILE, qra_folder, retune_folder, source_folder
from utils.record.store import (load_record, load_torch_file, portable_path)
from utils.commands.driver import (check_record_args, build_loaded_model, check_tag,
                                   find_clean_record, load_source_state)
from utils.engine.runtime import device_name
from utils.commands.driver import aborting, finish_run, open_record, parse_record_command, record_label, record_options, run_arguments, run_options, stage, start_runtime
from utils.config import Option, folder_name, non_negative, positive, seed, short, tag, within

DEFAULT_HIDDEN = (1024, 1024, 1024)  # the official generator's hidden widths
GENERATOR_INPUTS = ("normalised", "pixels")
POISON_SOURCES = ("record", "trigger")


def parse_widths(text: str) -> tuple[int, ...]:
    """'1024,1024,1024' -> (1024, 1024, 1024)."""
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1 or max(widths) > 65536 or len(widths) > 16:
        raise UserError(f"--hidden must be up to 16 comma-separated widths in 1..65536 such as 1024,1024,1024, "
                        f"got {short(text)}")
    return widths


# --- the generator ----------------------------------------------------------------------------

class PerturbationGenerator(nn.Module):
    """MLP on the flattened image: D -> hidden[0] -> ... -> hidden[-1] -> D, ReLU between, output
    `eps * tanh(.)` reshaped to the image. Takes images in [0, 1] (eps in the same units); with `mean`
    and `std` the MLP sees the normalised image, as the official generator does, else the [0, 1]
    pixels. Weights are drawn from a CPU generator seeded with `seed`, so the same seed gives the same
    generator on every device and the global RNG is never touched."""

    def __init__(self, shape: Sequence[int], hidden: Sequence[int] = DEFAULT_HIDDEN, eps: float = 16 / 255, seed: int = 0,
                 mean: Sequence[float] | torch.Tensor | None = None, std: Sequence[float] | torch.Tensor | None = None):
        super().__init__()
        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        if not hidden or min(hidden) < 1 or eps <= 0:
            raise UserError(f"the generator needs hidden widths >= 1 and eps > 0, got hidden {hidden}, eps {eps}")
        if (mean is None) != (std is None):
            raise UserError("the generator needs both mean and std, or neither")
        self.shape = tuple(int(s) for s in shape)
        self.eps = float(eps)
        self.normalises = mean is not None
        if self.normalises:  # not in the state dict: result.json records the input, the dataset the statistics
            view = (1, -1, 1, 1)
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(view), persistent=False)
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(view), persistent=False)
        dim = math.prod(self.shape)
        widths = [dim, *hidden, dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.utils.skip_init(nn.Linear, a, b))  # no default init: it would draw from the global RNG
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        gen = engine.make_generator(seed, torch.device("cpu"), "qra-generator-init")
        with torch.no_grad():
            for layer in self.net:
                if isinstance(layer, nn.Linear):  # the range of PyTorch's default Linear init
                    bound = 1.0 / math.sqrt(layer.in_features)
                    layer.weight.uniform_(-bound, bound, generator=gen)
                    layer.bias.uniform_(-bound, bound, generator=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """δ(x) for images `x` (N, C, H, W) in [0, 1]: float32, |δ| <= eps (tanh and the scaling run in
        float32 even under autocast, so a low-precision rounding can never push it past eps)."""
        if self.normalises:
            x = (x - self.mean) / self.std
        h = self.net(x.reshape(len(x), -1))
        return (self.eps * torch.tanh(h.float())).view(len(x), *self.shape)

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """x + δ(x), clipped to [0, 1]."""
        return (x.float() + self(x)).clamp(0.0, 1.0)


# --- frozen models on float images ------------------------------------------------------------

@dataclass
class FrozenModel:
    """A model in eval mode with frozen weights and the pipeline whose normalisation it expects;
    `logits` takes float images in [0, 1] and stays differentiable with respect to them."""

    model: nn.Module
    pipeline: engine.Pipeline

    def __post_init__(self):
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def logits(self, x: torch.Tensor, amp: torch.dtype | None = None) -> torch.Tensor:
        z = self.pipeline.float_batch(x)
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            out = self.model(z)
        return out.float()


def predict(net: FrozenModel, images_u8: torch.Tensor, generator: PerturbationGenerator | None = None,
            batch_size: int = 0, amp: torch.dtype | None = None) -> torch.Tensor:
    """Predicted labels for uint8 images, perturbed by `generator` when given."""
    if generator is not None:
        generator.eval()

    def perturbed(chunk: torch.Tensor) -> torch.Tensor:
        x = chunk.float() / 255.0
        if generator is not None:
            with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
                x = generator.perturb(x)
        return net.pipeline.float_batch(x)

    return engine.batched(net.model, images_u8, net.pipeline, lambda model, z: model(z).argmax(1), batch_size, amp,
                          make_batch=perturbed)


def evaluate(net: FrozenModel, clean_test: ImageSet, bd_test, clean_targets: torch.Tensor,
             generator: PerturbationGenerator | None = None, batch_size: int = 0,
             amp: torch.dtype | None = None) -> dict[str, float]:
    """C-Acc on the clean test set, ASR and RA on the backdoor test set, and `clean_to_target`: the
    share of all clean test images (target class included, as the official report counts) predicted
    as their backdoor label `clean_targets` (the target under all-to-one); each image perturbed by
    `generator` when given."""
    def rate(pred, labels):
        return float((pred == labels).float().mean()) if len(labels) else float("nan")

    clean_pred = predict(net, clean_test.images, generator, batch_size, amp)
    bd_pred = predict(net, bd_test.images, generator, batch_size, amp)
    return {"clean_acc": rate(clean_pred, clean_test.labels), "asr": rate(bd_pred, bd_test.targets),
            "ra": rate(bd_pred, bd_test.true_labels), "clean_to_target": rate(clean_pred, clean_targets)}


# --- training data and training ---------------------------------------------------------------

@dataclass
class AttackSamples:
    """QRA's training set: `images` uint8, `labels` the true labels, `targets` the backdoor label
    of the poisoned ones (the true label elsewhere), `poisoned` a bool mask."""

    images: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    poisoned: torch.Tensor

    def to(self, device: torch.device) -> "AttackSamples":
        return AttackSamples(*(t.to(device) for t in (self.images, self.labels, self.targets, self.poisoned)))


def recorded_poison_pool(poisoned_train: PoisonedTrainSet, target: int, label_trans: str) -> torch.Tensor:
    """Indices of the victim's poisoned training images QRA may use: all of them, less (all-to-one)
    those whose true label is the target, which the official code leaves out as well."""
    keep = poisoned_train.poison_mask.cpu()
    if label_trans == "all2one":
        keep = keep & (poisoned_train.true_labels.cpu() != target)
    return torch.nonzero(keep).flatten()


def draw_samples(train: ImageSet, trigger, target: int, label_trans: str, num_classes: int, n_clean: int, n_poison: int,
                 seed: int, poisoned_train: PoisonedTrainSet | None = None) -> tuple[AttackSamples, int]:
    """A seeded draw of `n_clean` clean training images and `n_poison` poisoned ones: first a seeded
    choice among the victim's own poisoned training images (`poisoned_train`, see
    `recorded_poison_pool`), then, for what they lack, other clean images with the test-time trigger
    (all-to-one: only non-target ones, as in the backdoor test set). Returns the samples and how many
    poisoned ones came from the record. Fewer are taken, with a warning, when the sets are too small."""
    labels = train.labels
    gen = engine.make_generator(seed, torch.device("cpu"), "qra-samples")
    order = torch.randperm(len(labels), generator=gen)
    clean_idx = order[:n_clean]
    images, true, targets = [train.images[clean_idx]], [labels[clean_idx]], [labels[clean_idx]]
    n_recorded = 0
    if poisoned_train is not None:
        pool = recorded_poison_pool(poisoned_train, target, label_trans)
        chosen = pool[torch.randperm(len(pool), generator=gen)[:n_poison]].sort().values
        n_recorded = len(chosen)
        idx = chosen.to(poisoned_train.images.device)
        images.append(poisoned_train.images[idx].cpu())
        true.append(poisoned_train.true_labels[idx].cpu())
        targets.append(poisoned_train.labels[idx].cpu())
    rest = order[n_clean:]
    if label_trans == "all2one":
        rest = rest[labels[rest] != target]
    made_idx = rest[:n_poison - n_recorded]
    n_poisoned = n_recorded + len(made_idx)
    if len(clean_idx) < n_clean or n_poisoned < n_poison:
        warnings.warn(f"the training set ({len(labels)} images) holds only {len(clean_idx)} clean and "
                      f"{n_poisoned} poisoned or poisonable images for QRA's {n_clean} + {n_poison}", stacklevel=2)
    if n_poisoned == 0:
        raise UserError(f"no training images left to poison after {len(clean_idx)} clean ones; lower --n_clean")
    if len(made_idx):
        bd = backdoor_test_set(train.images[made_idx], labels[made_idx], trigger, target, label_trans, num_classes)
        images.append(bd.images)
        true.append(bd.true_labels)
        targets.append(bd.targets)
    n_c = len(clean_idx)
    samples = AttackSamples(
        images=torch.cat(images), labels=torch.cat(true), targets=torch.cat(targets),
        poisoned=torch.cat([torch.zeros(n_c, dtype=torch.bool), torch.ones(n_poisoned, dtype=torch.bool)]),
    )
    return samples, n_recorded


@dataclass
class QRASettings:
    eps: float = 16 / 255  # in [0, 1] pixel units
    alpha_qra: float = 0.2
    epochs: int = 50
    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 128
    hidden: tuple[int, ...] = DEFAULT_HIDDEN
    normalised_input: bool = True  # the generator sees the normalised image (official), else [0, 1] pixels
    seed: int = 0
    progress: bool = True


def train_generator(purified: FrozenModel, retuned: FrozenModel, clean: FrozenModel, samples: AttackSamples,
                    settings: QRASettings, amp: torch.dtype | None = None) -> tuple[PerturbationGenerator, list[dict]]:
    """Fit a PerturbationGenerator to `samples` (on the models' device). Returns it and one row per
    epoch: mean loss terms, and on the epoch's perturbed training batches the purified model's and
    the clean model's ASR on the poisoned samples, the clean model's accuracy, and how often the
    purified model's prediction equals the retuned model's."""
    device = samples.images.device
    n = len(samples.labels)
    stats = (purified.pipeline.mean.flatten(), purified.pipeline.std.flatten()) if settings.normalised_input else (None, None)
    generator = PerturbationGenerator(samples.images.shape[1:], settings.hidden, settings.eps, settings.seed, *stats).to(device)
    optimizer = torch.optim.SGD(generator.parameters(), lr=settings.lr, momentum=settings.momentum)
    order_gen = engine.make_generator(settings.seed, device, "qra-batches")
    with torch.no_grad():  # the teacher is frozen and its inputs fixed: its log-probabilities once
        teacher = torch.cat([F.log_softmax(retuned.logits(samples.images[i:i + 512].float() / 255.0, amp), 1)
                             for i in range(0, n, 512)])
    teacher_pred = teacher.argmax(1)
    n_poison = max(int(samples.poisoned.sum()), 1)
    rows = []
    for epoch in tqdm(range(1, settings.epochs + 1), desc="qra", unit="epoch", leave=False, disable=not settings.progress):
        generator.train()
        sums = torch.zeros(7, device=device)  # loss, ce, kl, asr purified, asr clean, acc clean, imitation
        start = time.perf_counter()
        for idx in engine.index_batches(n, settings.batch_size, True, order_gen, device):
            x = samples.images[idx].float() / 255.0
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                x_adv = generator.perturb(x)
            p_logits = purified.logits(x_adv, amp)
            c_logits = clean.logits(x_adv, amp)
            kl = F.kl_div(F.log_softmax(p_logits, 1), teacher[idx], reduction="batchmean", log_target=True)
            ce = F.cross_entropy(c_logits, samples.labels[idx])
            loss = ce + settings.alpha_qra * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                b = len(idx)
                pois = samples.poisoned[idx]
                tgt = samples.targets[idx]
                p_pred, c_pred = p_logits.argmax(1), c_logits.argmax(1)
                sums += torch.stack([loss.detach() * b, ce.detach() * b, kl.detach() * b,
                                     ((p_pred == tgt) & pois).sum(), ((c_pred == tgt) & pois).sum(),
                                     (c_pred == samples.labels[idx]).sum(), (p_pred == teacher_pred[idx]).sum()]).float()
        s = sums.tolist()
        rows.append({"epoch": epoch, "loss": s[0] / n, "ce_clean": s[1] / n, "kl": s[2] / n,
                     "train_asr_purified": s[3] / n_poison, "train_asr_clean": s[4] / n_poison,
                     "train_acc_clean": s[5] / n, "imitation": s[6] / n, "seconds": time.perf_counter() - start})
    generator.eval()
    return generator, rows


# --- command line -----------------------------------------------------------------------------

DESCRIPTION = ("Query-based reactivation attack (QRA) on a purified model: learn an "
                                            "input perturbation that makes it behave like its retuned version.")


def options() -> list[Option]:
    """Every setting of the command (flags, and keys of a --yaml_path file)."""
    return [
        *record_options(),
        Option("defense_type", str, 'fst', "purification under defense/ to attack, or none for the record's own model (default fst)", check=folder_name),
        Option("retune_tag", str, '', 'tag of the retuning run (ft_poison.py --tag) whose model is imitated (default none)', check=tag),
        Option("clean_record", str, None, 'record folder of the clean reference model (default: the pratio-0 record of the same dataset and architecture)'),
        Option("eps", float, 16.0, 'L-inf bound of the perturbation in pixels out of 255 (default 16)', check=within(0, 255, low_open=True)),
        Option("alpha_qra", float, 0.2, 'weight of the KL imitation term (default 0.2)', check=non_negative),
        Option("n_clean", int, 500, 'clean training images (default 500)', check=positive),
        Option("n_poison", int, 500, 'poisoned training images (default 500)', check=positive),
        Option("epochs", int, 50, 'generator training epochs (default 50)', check=positive),
        Option("lr", float, 0.1, 'SGD learning rate (default 0.1)', check=positive),
        Option("momentum", float, 0.9, 'SGD momentum (default 0.9)', check=within(0, 1, high_open=True)),
        Option("batch_size", int, 128, 'training batch size (default 128)', check=positive),
        Option("hidden", str, ','.join(map(str, DEFAULT_HIDDEN)), 'hidden widths of the generator MLP, comma-separated (default 1024,1024,1024 as officially; the earlier toolkit generator was 512,128,512)'),
        Option("generator_input", str, 'normalised', 'what the generator sees: the normalised image (official) or the [0, 1] pixels (default normalised)', choices=GENERATOR_INPUTS),
        Option("poison_source", str, 'record', "record: the victim's own poisoned training images, topped up with triggered clean ones when too few (official); trigger: clean training images with the test-time trigger (default record)", choices=POISON_SOURCES),
        Option("random_seed", int, 0, 'seed of the sample draw, generator init and batch order (default 0)', check=seed),
        *run_options("write to qra_<tag>/ instead of qra/", "replace an existing result (default false)"),
    ]


def parse_args(argv=None) -> argparse.Namespace:
    return parse_record_command(options(), argv, DESCRIPTION)


def _settle_args(args: argparse.Namespace) -> None:
    """Check every value before any work starts."""
    check_record_args(args)
    check_tag(args.tag)
    check_tag(args.retune_tag, "--retune_tag")
    args.hidden = ",".join(map(str, parse_widths(args.hidden)))


def _record_label(folder: Path, root: str) -> str:
    """dataset/attack/name for a record under the record root, else a portable path."""
    try:
        return str(Path(folder).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return portable_path(str(folder))


def _check_records(record: dict, clean_rec: dict, args: argparse.Namespace, folder: Path, clean_folder: Path) -> None:
    for key in ("dataset", "model_name", "num_classes", "in_channels", "image_size"):
        if clean_rec[key] != record[key]:
            raise UserError(f"clean record {clean_folder} has {key.replace('_name', '')} {clean_rec[key]!r} but the "
                            f"record has {record[key]!r}; pass a matching --clean_record")
    if clean_rec["pratio"] != 0:
        warnings.warn(f"clean record {clean_folder} was trained with pratio {clean_rec['pratio']}, not 0", stacklevel=2)


def format_table(before: dict, after: dict) -> str:
    """Model x (C-Acc, ASR, clean predicted as the target) without and with δ, in percent."""
    head = f"{'model':<10} {'C-Acc':>7} {'ASR':>7} {'C→tgt':>7}   {'C-Acc+δ':>8} {'ASR+δ':>7} {'C+δ→tgt':>8}"
    lines = [head, "-" * len(head)]
    for name in ("retuned", "purified", "clean"):
        b, a = before[name], after.get(name)
        right = (f"{100 * a['clean_acc']:8.2f} {100 * a['asr']:7.2f} {100 * a['clean_to_target']:8.2f}" if a
                 else f"{'-':>8} {'-':>7} {'-':>8}")
        lines.append(f"{name:<10} {100 * b['clean_acc']:7.2f} {100 * b['asr']:7.2f} {100 * b['clean_to_target']:7.2f}   {right}")
    lines.append("C→tgt: share of all clean test images predicted as the target (C+δ→tgt: with δ added)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run QRA from command-line flags; returns {"before", "after", "folder"}."""
    args = parse_args(argv)
    _settle_args(args)
    folder, record = open_record(args)
    source = source_folder(folder, args.defense_type)
    purified_state = load_source_state(record, folder, args.defense_type)
    retune_path = retune_folder(source, args.retune_tag) / MODEL_FILE
    if not retune_path.is_file():
        tag_flag = f" --tag {args.retune_tag}" if args.retune_tag else ""
        raise UserError(f"no retuned model at {retune_path}; run fine_tune/ft_poison.py with the same record flags and "
                        f"--defense_type {args.defense_type}{tag_flag} first")
    clean_folder = find_clean_record(args.record_root, args.dataset, args.model, args.attack, args.attack_target, args.clean_record)
    clean_rec = load_record(clean_folder)
    _check_records(record, clean_rec, args, folder, clean_folder)
    staged = stage({"qra": qra_folder(source, args.tag)}, args.overwrite, "QRA result")["qra"]
    with aborting([staged]):
        return _run(args, folder, record, source, purified_state, retune_path, clean_folder, clean_rec, staged)


def _run(args, folder, record, source, purified_state, retune_path, clean_folder, clean_rec, staged) -> dict:
    start = time.perf_counter()
    rt = start_runtime(args, record)
    device, amp, exp = rt.device, rt.amp, rt.exp
    pipe = exp.pipeline
    source_name = str(source / MODEL_FILE) if args.defense_type != NONE else str(folder / RECORD_FILE)
    purified = FrozenModel(build_loaded_model(record, purified_state, source_name, pipe, device), pipe)
    retuned = FrozenModel(build_loaded_model(record, load_torch_file(retune_path, "retuned model"), str(retune_path),
                                             pipe, device), pipe)
    clean_pipe = engine.Pipeline.for_dataset(exp.info, device, clean_rec.get("input_size") or None)
    clean = FrozenModel(build_loaded_model(clean_rec, clean_rec["model"], str(clean_folder / RECORD_FILE), clean_pipe, device),
                        clean_pipe)
    trigger = make_trigger(get_attack(record["attack"]), exp.trigger_params, False)
    target, label_trans = record["attack_target"], record["attack_label_trans"]
    samples, n_recorded = draw_samples(exp.clean_train, trigger, target, label_trans, exp.info.num_classes, args.n_clean,
                                       args.n_poison, args.random_seed,
                                       exp.train if args.poison_source == "record" else None)
    samples = samples.to(device)
    n_poison = int(samples.poisoned.sum())
    n_clean = len(samples.labels) - n_poison
    print(f"QRA on {folder} (defense {args.defense_type}, retuned model {retune_path.parent.name}), clean reference "
          f"{clean_folder}; {n_clean} clean + {n_poison} poisoned images ({n_recorded} the victim's own poisoned "
          f"training images, {n_poison - n_recorded} clean ones with the test trigger), eps {args.eps:g}/255, "
          f"device {device_name(device)}", flush=True)
    clean_targets = backdoor_labels(exp.clean_test.labels, target, label_trans, exp.info.num_classes)

    def evaluate_all(nets: dict[str, FrozenModel], generator=None) -> dict[str, dict]:
        return {k: evaluate(v, exp.clean_test, exp.bd_test, clean_targets, generator, args.eval_batch_size, amp)
                for k, v in nets.items()}

    before = evaluate_all({"retuned": retuned, "purified": purified, "clean": clean})
    settings = QRASettings(eps=args.eps / 255.0, alpha_qra=args.alpha_qra, epochs=args.epochs, lr=args.lr,
                           momentum=args.momentum, batch_size=args.batch_size, hidden=parse_widths(args.hidden),
                           normalised_input=args.generator_input == "normalised", seed=args.random_seed,
                           progress=args.progress)
    generator, rows = train_generator(purified, retuned, clean, samples, settings, amp)
    after = evaluate_all({"purified": purified, "clean": clean}, generator)
    seconds = time.perf_counter() - start

    final = finish_run(staged, {
        "record": record_label(record, folder), "defense_type": args.defense_type,
        "retuned_model": retune_folder("", args.retune_tag).name, "clean_record": _record_label(clean_folder, args.record_root),
        "settings": {**{k: v for k, v in asdict(settings).items() if k != "progress"}, "eps_pixels": args.eps, "n_clean": n_clean, "n_poison": n_poison,
                     "poison_source": args.poison_source, "n_poison_recorded": n_recorded, "n_poison_made": n_poison - n_recorded,
                     "amp": str(amp).replace("torch.", "") if amp else "none"},
        "before": before, "after": after, "seconds": round(seconds, 2), "device": device_name(device),
    }, rows, run_arguments(args, dataset_path=exp.dataset_path), weights=generator.state_dict(), weights_file=GENERATOR_FILE)
    print()
    print(format_table(before, after))
    gap = after["purified"]["asr"] - after["clean"]["asr"]
    print(f"ASR with δ: purified {100 * after['purified']['asr']:.2f}, clean {100 * after['clean']['asr']:.2f} "
          f"(gap {100 * gap:.2f}); clean + δ predicted as the target: purified "
          f"{100 * after['purified']['clean_to_target']:.2f}, clean {100 * after['clean']['clean_to_target']:.2f}; "
          f"results in {final}")
    return {"before": before, "after": after, "folder": str(final)}
