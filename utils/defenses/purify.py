"""Fine-tuning purification: the five modes of FST (docs/protocol.md §5) as small descriptions run by the
shared training loop.

A mode says whether the head is re-initialised, which parameters train, and whether the FST
feature-shift term `alpha * <W, W_orig>` joins the loss. The head-norm projection (rescale the head
weight to the backdoored head's Frobenius norm after every step) is switchable: the official code
applies it in every mode, the paper describes it for FST; it belongs to the five FST modes only.

Three more modes come from the post-purification robustness work (docs/protocol.md §6):
- `ft-sam`: fine-tuning with (adaptive) sharpness-aware minimisation steps (BackdoorBench's FT-SAM);
- `bti`: BTI-DBF(U) unlearning as the official code runs it: in every batch int(0.2 B + 1) random
  images are replaced by the output of an inverted-trigger generator (utils/defenses/bti.py), with the true
  labels; the loss is CE on that mixed batch plus the MSE between the last-stage feature maps of
  the clean and the mixed batch; Adam, lr 1e-4, constant;
- `pam`: the same synthesised batches, CE only, with path-aware minimisation steps (gradient taken
  at ρ along the straight path from the current weights towards the backdoored ones, see
  utils/defenses/sharpness.py); SGD lr 0.01, momentum 0.1, constant.
Both run `rounds` rounds (official: 3) of trigger inversion followed by `epochs` epochs (30).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from models import get_head
from utils.defenses import bti
from utils import engine
from utils.record import resources
from utils.errors import UserError
from utils.defenses.sharpness import WeightShift, path_offsets, sam_offsets
from utils.config import Option, non_negative, parse_bool, positive, short, within


@dataclass(frozen=True)
class Mode:
    """One purification mode: what it re-initialises and trains, its loss and step, and its defaults."""

    name: str
    title: str  # the name tables and figures print
    reinit_head: bool
    trains: str  # "all", "head" or "backbone"
    feature_shift: bool
    summary: str
    fst: bool = False  # one of the FST paper's five modes: run by `--ft_mode all`, head-norm projection applies
    step: str = "sgd"  # "sgd", "sam" or "pam": where the gradient of each step is taken
    unlearn: bool = False  # BTI-DBF unlearning (synthesised trigger images with their true labels)
    feature_mse: bool = False  # BTI-DBF(U): + MSE between the feature maps of the clean and the mixed batch
    optimizer: str = "sgd"  # "sgd" (momentum from the settings) or "adam"
    schedule: str = "cosine"  # "cosine" over the epochs, "constant", or "plateau" (see PurifySettings.schedule)
    defaults: tuple = ()  # (option, value) pairs that replace the per-dataset defaults for this mode
    #: (dataset, ((option, value), ...)) pairs over `defaults` for one data set, where the published
    #: settings of the method differ by data set (BackdoorBench's config/defense/<method>/tiny.yaml)
    dataset_defaults: tuple = ()
    options: tuple = ()  # the mode's own settings (flags of ft.py, keys of its YAML)
    #: a defense that is not a variant of the fine-tuning loop above (pruning, trigger reversal,
    #: distillation, ...): `algorithm(model, mode, tuning) -> (purified model, rows)`, given a copy of
    #: the backdoored model and a `Tuning`. The description fields above then only name the mode;
    #: the algorithm may run the shared loop for its fine-tuning phases (`purify(..., hooks=...)`
    #: with `FINETUNE`). Rows are one dict per epoch, as the loop's, with at least
    #: epoch/lr/train_loss/train_acc/clean_acc/asr/ra (the last row's metrics are the result).
    algorithm: Callable | None = None
    #: the algorithm needs the record's poisoned training samples with their true labels (`Tuning.poisoned`)
    needs_poisoned: bool = False
    #: shared tuning settings (ft.py's split_ratio, epochs, lr, momentum, batch_size, wd, lr_schedule,
    #: lb_smooth) the algorithm never reads; ft.py warns when one of them is given for the mode
    ignores: tuple = ()
    #: what a run of the mode does, for ft.py's start line, from the mode's resolved settings; None
    #: means "tuning on N images, E epochs, lr, momentum", right for every mode that runs the loop
    plan: Callable | None = None


@dataclass
class PoisonedSamples:
    """The record's poisoned training images as the victim saw them (trigger applied, uint8, on the
    tuning device) with their true, not their backdoor, labels."""

    images: torch.Tensor
    true_labels: torch.Tensor


@dataclass
class StepHooks:
    """What an algorithm adds to the shared loop: `extra_loss(net, x, y, logits)` joins every step's
    loss (NAD's attention term), `after_step()` runs after every optimiser step (keeping pruned
    weights at zero)."""

    extra_loss: Callable | None = None
    after_step: Callable | None = None


@dataclass
class Tuning:
    """Everything a purification algorithm (`Mode.algorithm`) works with. It reports through
    `result` (extra keys of result.json, e.g. anomaly indices) and `artifacts` (file name -> bytes,
    written into the result folder, e.g. reversed triggers as PNG)."""

    images: torch.Tensor       # the clean tuning images, uint8, on the device
    labels: torch.Tensor
    pipeline: object           # engine.Pipeline: augmentation and normalisation of batches
    settings: "PurifySettings"
    evaluate: Callable         # net -> {"clean_acc", "asr", "ra"} on the record's test sets
    amp: object = None
    poisoned: PoisonedSamples | None = None
    result: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)

    def option(self, name: str):
        """A mode setting (one of `Mode.options`) as resolved for this run."""
        if name not in self.settings.extra:
            raise KeyError(f"mode setting {name!r} was not resolved for this run")
        return self.settings.extra[name]


# the settings only some modes read; each mode lists the ones it uses
FT_SAM_PRESETS = ("toolkit", "backdoorbench")
FT_SAM_OPTIONS = (
    Option("ft_sam_preset", str, 'toolkit', "ft-sam settings: toolkit (this toolkit's: the dataset's split/epochs/lr, batch 128, label smoothing 0.1, no weight decay, cosine per epoch) or backdoorbench (BackdoorBench's CIFAR-10 FT-SAM: 5%% split, 100 epochs, batch 256, lr 0.01, wd 5e-4, label smoothing 0.1 spread over the other classes, cosine with T_max 100 stepped per batch). Which one the NeurIPS 2024 paper used is not published; flags still win", choices=FT_SAM_PRESETS),
    Option("sam_rho", float, 2.0, 'ft-sam: neighbourhood radius (default 2.0)', check=positive),
    Option("sam_adaptive", parse_bool, True, "ft-sam: adaptive SAM, radius relative to the weights' magnitudes (default true)"),
)
PAM_OPTIONS = (
    Option("pam_rho", float, 0.5, 'pam: distance of the gradient point along the path to the backdoored weights (default 0.5)', check=non_negative),
)
UNLEARN_OPTIONS = (
    Option("rounds", int, 3, 'bti/pam: rounds of trigger inversion followed by --epochs epochs of unlearning (default 3)', check=positive),
    Option("unlearn_ratio", float, 0.2, 'bti/pam: share of each batch replaced by synthesised trigger images (default 0.2)', check=within(0, 1)),
    Option("bti_pretrain_epochs", int, 50, 'bti/pam: generator pre-training epochs (default 50, official)', check=non_negative),
    Option("bti_mask_epochs", int, 20, 'bti/pam: feature-mask epochs per round (default 20, official)', check=non_negative),
    Option("bti_gen_epochs", int, 30, 'bti/pam: backdoor-generator epochs per round (default 30, official)', check=non_negative),
    Option("bti_norm_bound", float, 0.3, 'bti/pam: image MSE (normalised input space) above which the generator only shrinks its change (default 0.3)', check=positive),
    Option("bti_feat_bound", float, 3.0, 'bti/pam: benign-feature MSE above which the generator only shrinks its change (default 3)', check=positive),
    Option("bti_unet_width", int, 32, 'bti/pam: base filters of the generator UNet (default 32, official; 8 makes CPU runs ~16x cheaper)', check=positive),
    Option("bti_generator_rounds", str, 'all', "bti/pam: train the backdoor generator in every round (default: BTI-DBF's design, and the official bti baseline) or only in the first (what the shipped official PAM code does)", choices=('all', 'first')),
)

#: every registered mode, in the order tables print them
ALL_MODES: dict[str, Mode] = {}


def register_mode(mode: Mode) -> Mode:
    if mode.name in ALL_MODES or mode.name in ("all", "none"):
        raise ValueError(f"purification mode {mode.name!r} registered twice or reserved")
    ALL_MODES[mode.name] = mode
    return mode


# The five modes of the FST paper (`--ft_mode all`).
register_mode(Mode("ft", "FT", False, "all", False, "vanilla fine-tuning of every parameter", fst=True))
register_mode(Mode("lp", "LP", False, "head", False, "linear probing: only the head trains", fst=True))
register_mode(Mode("fe-tuning", "FE-tuning", True, "backbone", False, "head re-initialised and frozen, backbone trains", fst=True))
register_mode(Mode("ft-init", "FT-init", True, "all", False, "head re-initialised, everything trains", fst=True))
register_mode(Mode("fst", "FST", True, "all", True, "head re-initialised, everything trains, loss + alpha <W, W_orig>", fst=True))
# The post-purification robustness work (NeurIPS 2024): FT-SAM, BTI-DBF(U) and PAM.
# the official PAM protocol: 5% clean split, 3 rounds of 30 epochs at a constant learning rate
UNLEARN_DEFAULTS = (("split_ratio", 0.05), ("epochs", 30))
register_mode(Mode("ft-sam", "FT-SAM", False, "all", False, "fine-tuning with adaptive sharpness-aware minimisation (FT-SAM)",
                   step="sam", defaults=(("lb_smooth", 0.1),), options=FT_SAM_OPTIONS))
register_mode(Mode("bti", "BTI", False, "all", False, "BTI-DBF(U) unlearning: CE on inverted-trigger images with their true "
                   "labels + feature-map MSE to the clean batch, Adam", unlearn=True, feature_mse=True, optimizer="adam",
                   schedule="constant", defaults=UNLEARN_DEFAULTS + (("lr", 1e-4),), options=UNLEARN_OPTIONS))
register_mode(Mode("pam", "PAM", False, "all", False, "BTI-DBF unlearning with path-aware minimisation steps (PAM)",
                   step="pam", unlearn=True, schedule="constant", defaults=UNLEARN_DEFAULTS + (("lr", 0.01), ("momentum", 0.1)),
                   options=PAM_OPTIONS + UNLEARN_OPTIONS))

#: the plain fine-tuning phase of the baselines (FP, NAD, NC, EP ...): every parameter trains, cosine
#: schedule, no head re-initialisation, no head-norm projection (not one of the FST modes). Not registered.
FINETUNE = Mode("finetune", "fine-tuning", False, "all", False, "plain fine-tuning, the fine-tuning phase of a baseline")

class _ModeView(Mapping):
    """A live, read-only view of the registered modes that pass `keep`: modes registered later (the
    baselines in their own modules, a user's extension) show up in it."""

    def __init__(self, keep: Callable[[Mode], bool]):
        self._keep = keep

    def __getitem__(self, name: str) -> Mode:
        mode = ALL_MODES[name]
        if not self._keep(mode):
            raise KeyError(name)
        return mode

    def __iter__(self):
        return (name for name, mode in ALL_MODES.items() if self._keep(mode))

    def __len__(self) -> int:
        return sum(1 for _ in self)


#: views of the registry: the FST paper's five modes, and the others
MODES: Mapping[str, Mode] = _ModeView(lambda mode: mode.fst)
EXTRA_MODES: Mapping[str, Mode] = _ModeView(lambda mode: not mode.fst)
NORM_PROJ = ("all", "fst", "none")

# Published settings per dataset (split_ratio, lr, epochs, alpha); fmnist follows CIFAR-10.
DATASET_DEFAULTS = {
    "cifar10": (0.02, 0.01, 10, 0.2),
    "gtsrb": (0.02, 0.01, 15, 0.1),
    "cifar100": (0.05, 0.001, 15, 0.001),
    "tiny": (0.05, 0.001, 15, 0.001),
    "fmnist": (0.02, 0.01, 10, 0.2),
}


def get_mode(name: str) -> Mode:
    if name not in ALL_MODES:
        raise UserError(f"unknown --ft_mode {short(name)}; choose one of: {', '.join(ALL_MODES)}, all "
                        f"(= {', '.join(MODES)}), or a comma-separated list")
    return ALL_MODES[name]


def parse_modes(text: str) -> list[str]:
    """`all` (the five FST modes), one mode, or a list of modes separated by commas or spaces."""
    if text.strip() == "all":
        return list(MODES)
    names = text.replace(",", " ").split()
    if not names:
        raise UserError("--ft_mode is empty")
    out: list[str] = []
    for name in names:
        if get_mode(name).name not in out:
            out.append(name)
    return out


def tuning_indices(labels: torch.Tensor, split_ratio: float, seed: int, balanced: bool = False) -> torch.Tensor:
    """The clean tuning subset: `int(N * split_ratio)` indices drawn uniformly with a generator derived
    from the seed, or (balanced) the first `k // C` images of each class as the 2023 code did."""
    if not 0.0 < split_ratio <= 1.0:
        raise UserError(f"split_ratio must be within (0, 1], got {split_ratio}")
    labels = labels.cpu()
    count = int(len(labels) * split_ratio)
    if count < 1:
        raise UserError(f"split_ratio {split_ratio} of {len(labels)} training images selects no image")
    if balanced:
        classes = int(labels.max()) + 1
        per_class = max(1, count // classes)
        picks = [torch.nonzero(labels == c).flatten()[:per_class] for c in range(classes)]
        return torch.cat(picks).sort().values
    gen = torch.Generator().manual_seed(engine.derive_seed(seed, "tuning-split"))
    return torch.randperm(len(labels), generator=gen)[:count].sort().values


def der(before: dict, after: dict) -> float:
    """Defense effectiveness rating (BackdoorBench), on fractions."""
    return (max(0.0, before["asr"] - after["asr"]) - max(0.0, before["clean_acc"] - after["clean_acc"]) + 1) / 2


def reinit_linear(layer: nn.Linear, seed: int) -> None:
    """Weight and bias uniform in +-1/sqrt(fan_in) (PyTorch's default Linear bounds), seeded."""
    bound = 1.0 / layer.in_features ** 0.5
    gen = torch.Generator().manual_seed(engine.derive_seed(seed, "head-init"))
    with torch.no_grad():
        layer.weight.copy_(torch.empty(layer.weight.shape).uniform_(-bound, bound, generator=gen))
        if layer.bias is not None:
            layer.bias.copy_(torch.empty(layer.bias.shape).uniform_(-bound, bound, generator=gen))


#: the per-epoch learning-rate schedules of the tuning loop (`PurifySettings.schedule`)
SCHEDULES = ("cosine", "constant", "plateau")


@dataclass
class PurifySettings:
    epochs: int
    lr: float
    alpha: float
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0
    # > 0: cosine annealing stepped after every batch with this period (BackdoorBench FT-SAM's
    # CosineAnnealingLR(T_max=100) stepped per batch) instead of the mode's per-epoch schedule
    batch_cosine_tmax: int = 0
    # the per-epoch learning-rate schedule: "" the mode's own, else "cosine" (over the epochs),
    # "constant", or "plateau": torch's ReduceLROnPlateau with its defaults (x0.1 after 10 epochs
    # without a lower mean training loss), stepped on each epoch's mean training loss, which is how
    # BackdoorBench's trainer runs the ReduceLROnPlateau of its Tiny-ImageNet defense configs
    schedule: str = ""
    label_smoothing: float = 0.0
    norm_proj: str = "all"
    frozen_bn_eval: bool = False
    seed: int = 0
    linear_name: str | None = None
    progress: bool = True
    eval_every: int = 1           # evaluate after every k-th epoch and the last (others get NaN metrics)
    sam_rho: float = 2.0          # FT-SAM neighbourhood radius (BackdoorBench: 2.0 with adaptive SAM)
    sam_adaptive: bool = True
    pam_rho: float = 0.5          # PAM: distance of the evaluation point along the path to the backdoored weights
    rounds: int = 3               # bti/pam: rounds of (re-invert the trigger, `epochs` epochs of unlearning)
    unlearn_ratio: float = 0.2    # bti/pam: share of each batch replaced by synthesised trigger images
    bti: object = None            # bti/pam: utils.defenses.bti.BTISettings (None: its defaults with this seed)
    # bti/pam: a dict shared by the modes of one run, so that they reuse one pre-trained generator
    # (pre-training depends only on the backdoored model, the tuning images and the BTI settings)
    shared: dict | None = None
    #: the resolved values of the mode's own options (`Mode.options`), read by algorithms through `Tuning.option`
    extra: dict = field(default_factory=dict)


def _set_trainable(model: nn.Module, head: nn.Linear, trains: str) -> list[nn.Parameter]:
    head_ids = {id(p) for p in head.parameters()}
    params = []
    for p in model.parameters():
        in_head = id(p) in head_ids
        p.requires_grad_(trains == "all" or (trains == "head") == in_head)
        if p.requires_grad:
            params.append(p)
    return params


def _freeze_bn(model: nn.Module) -> None:
    """Put BatchNorm layers whose parameters are all frozen into eval mode (running stats fixed)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in module.parameters(recurse=False)):
                module.eval()


def purify(model: nn.Module, mode: Mode, images: torch.Tensor, labels: torch.Tensor, pipeline: engine.Pipeline,
           settings: PurifySettings, evaluate: Callable[[nn.Module], dict], amp=None,
           info: dict | None = None, poisoned: PoisonedSamples | None = None,
           hooks: StepHooks | None = None) -> tuple[nn.Module, list[dict]]:
    """Purify a copy of `model` on the tuning set; returns it and one metrics row per epoch.
    Unlearning modes run `settings.rounds` rounds of `settings.epochs` epochs and report each round's
    trigger inversion (detected target label and its share) in `info["rounds"]` when `info` is given.
    A mode with an `algorithm` runs it instead; what it reports lands in `info["result"]` and
    `info["artifacts"]`."""
    model = copy.deepcopy(model)
    if mode.algorithm is not None:
        if mode.needs_poisoned and poisoned is None:
            raise UserError(f"--ft_mode {mode.name} needs the record's poisoned training samples")
        tuning = Tuning(images, labels, pipeline, settings, evaluate, amp, poisoned)
        model, rows = mode.algorithm(model, mode, tuning)
        if info is not None:
            info["result"], info["artifacts"] = tuning.result, tuning.artifacts
        return model, rows
    head = get_head(model, settings.linear_name)
    orig_weight = head.weight.detach().clone()
    orig_norm = orig_weight.norm()
    if mode.reinit_head:
        reinit_linear(head, settings.seed)
    params = _set_trainable(model, head, mode.trains)
    if mode.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    total_epochs = settings.epochs * (settings.rounds if mode.unlearn else 1)
    schedule = settings.schedule or mode.schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; one of {', '.join(SCHEDULES)}")
    scheduler = (engine.cosine_scheduler(optimizer, total_epochs) if schedule == "cosine"
                 else torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer) if schedule == "plateau" else None)
    batch_scheduler = None
    if settings.batch_cosine_tmax > 0:
        scheduler = None
        batch_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.batch_cosine_tmax)
    project = mode.fst and (settings.norm_proj == "all" or (settings.norm_proj == "fst" and mode.feature_shift))
    shift = WeightShift(params) if mode.step != "sgd" else None
    anchor = [p.detach().clone() for p in params] if mode.step == "pam" else None
    unlearning = _Unlearning(model, images, labels, pipeline, settings, amp) if mode.unlearn else None
    mix_gen = engine.make_generator(settings.seed, images.device, f"unlearn-mix-{mode.name}")

    def objective(logits, y):
        loss = F.cross_entropy(logits, y, label_smoothing=settings.label_smoothing)
        if mode.feature_shift:
            # Frobenius inner product with the backdoored head; the bias is not penalised
            loss = loss + settings.alpha * (head.weight * orig_weight).sum()
        return loss

    def loss_fn(net, x, y, idx):
        if unlearning is not None:
            clean, x = x, unlearning.mix(x, mix_gen)
            if mode.feature_mse:
                mixed_maps = net.feature_maps(x)
                logits = net.logits_from_maps(mixed_maps)
                feature_term = F.mse_loss(net.feature_maps(clean).float(), mixed_maps.float())
                return objective(logits, y) + feature_term, logits
        if mode.step == "sam":
            grads = torch.autograd.grad(objective(net(x), y), params, allow_unused=True)
            shift.apply(sam_offsets(params, grads, settings.sam_rho, settings.sam_adaptive))
        elif mode.step == "pam":
            shift.apply(path_offsets(params, anchor, settings.pam_rho))
        logits = net(x)
        loss = objective(logits, y)
        if hooks is not None and hooks.extra_loss is not None:
            loss = loss + hooks.extra_loss(net, x, y, logits)
        return loss, logits

    def after_step():
        if batch_scheduler is not None:
            batch_scheduler.step()
        if hooks is not None and hooks.after_step is not None:
            hooks.after_step()
        if project:
            with torch.no_grad():
                head.weight.mul_(orig_norm / head.weight.norm().clamp_min(1e-12))

    def train_mode(net: nn.Module) -> None:
        net.train()
        if settings.frozen_bn_eval:
            _freeze_bn(net)

    gen = engine.make_generator(settings.seed, images.device, f"tune-order-{mode.name}")
    rows = []
    for epoch in tqdm(range(1, total_epochs + 1), desc=mode.name, unit="ep", leave=False,
                      disable=not settings.progress, dynamic_ncols=True):
        extra = {}
        if unlearning is not None:
            extra["round"] = (epoch - 1) // settings.epochs + 1
            if (epoch - 1) % settings.epochs == 0:
                found = unlearning.invert(model, extra["round"])
                if info is not None:
                    info.setdefault("rounds", []).append(found)
        lr = optimizer.param_groups[0]["lr"]
        stats = engine.train_epoch(model, images, labels, pipeline, optimizer, settings.batch_size, gen, loss_fn,
                                   after_step, amp, desc="tune", progress=settings.progress, set_train_mode=train_mode,
                                   before_step=shift.restore if shift is not None else None)
        if scheduler is not None:
            scheduler.step(stats["train_loss"]) if schedule == "plateau" else scheduler.step()
        if epoch % settings.eval_every == 0 or epoch == total_epochs:
            metrics = evaluate(model)
        else:
            metrics = dict.fromkeys(("clean_acc", "asr", "ra"), float("nan"))
        rows.append({"epoch": epoch, **extra, "lr": lr, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
                     **metrics, "head_weight_norm": float(head.weight.detach().norm()),
                     "head_cosine_to_orig": float(F.cosine_similarity(head.weight.detach().flatten(),
                                                                      orig_weight.flatten(), dim=0))})
    for p in model.parameters():
        p.requires_grad_(True)
    return model, rows


class _Unlearning:
    """BTI-DBF's side of the bti/pam modes: trigger inversion at the start of each round (see
    `bti.Inverter`) and the batch mixing of the official code: int(ratio * B + 1) images at random
    positions of each batch (none when the ratio is 0) replaced by generator outputs, labels unchanged."""

    def __init__(self, model, images, labels, pipeline, settings: PurifySettings, amp):
        self.ratio = settings.unlearn_ratio
        cfg = settings.bti or bti.BTISettings(seed=settings.seed, progress=settings.progress,
                                              batch_size=settings.batch_size)
        shared = settings.shared if settings.shared is not None else {}
        key = ("bti-pretrain", resources.tensor_digest(images.cpu()), cfg.pretrain_epochs, cfg.pretrain_lr,
               cfg.unet_width, cfg.unet_blocks, cfg.batch_size, cfg.seed)
        if key not in shared:
            generator = bti.UNetGenerator(images.shape[1], cfg.unet_width, cfg.unet_blocks, cfg.seed).to(images.device)
            rows = bti.pretrain_generator(generator, model, images, pipeline, cfg, amp)
            shared[key] = (generator.state_dict(), rows)
        state, rows = shared[key]
        generator = bti.UNetGenerator(images.shape[1], cfg.unet_width, cfg.unet_blocks, cfg.seed).to(images.device)
        generator.load_state_dict(state)
        self.inverter = bti.Inverter(model, images, labels, pipeline, cfg, amp, generator, rows)

    def invert(self, model: nn.Module, round_no: int) -> dict:
        return self.inverter.invert(model, round_no)

    def mix(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        k = min(len(x), int(self.ratio * len(x) + 1)) if self.ratio > 0 else 0
        if k == 0:
            return x
        pos = torch.randperm(len(x), device=x.device, generator=gen)[:k]
        x = x.clone()
        x[pos] = bti.synthesize(self.inverter.generator, x[pos]).to(x.dtype)
        return x


def mode_options() -> list:
    """The settings of every registered mode, each once (modes may share them, as bti and pam do)."""
    seen: dict = {}
    for mode in ALL_MODES.values():
        for opt in mode.options:
            seen.setdefault(opt.name, opt)
    return list(seen.values())
