"""The model an attack computes its resources against (LC's PGD images, LF's universal pattern).

Either a record the user names (`--surrogate_record record/fmnist/badnet/pratio_0.0-...`), or a
model the toolkit trains on the victim's own clean training images, cached as a resource
(`surrogate` kind) and resumable per epoch. That model is either standard (clean training on the
dataset's normalised input) or adversarially trained (`adversarial=True`, LC's default): PGD
adversarial training in the manner of Madry et al., every batch replaced by L-inf PGD examples
before the step, on unnormalised input in [0, 1] as the original LC surrogate takes it. Its
perturbations have to change what the image shows to fool it, which is what LC relies on.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import models
from utils import engine
from utils.attacks import adversarial
from utils.config import REPO_ROOT, Option, parse_bool, non_negative, within
from utils.errors import UserError
from utils.record.resources import (
    RESOURCE_OPTIONS,
    Resource,
    precision_key,
    state_digest,
    tensor_digest,
)
from utils.record.store import clean_state_dict, load_record, load_state_dict_checked

SURROGATE_OPTIONS = RESOURCE_OPTIONS + [
    Option("surrogate_record", str, "", "record folder whose model is the surrogate (empty: train a clean one)"),
    Option("surrogate_model", str, "", "architecture of the trained surrogate (empty: the victim's --model)", check=models.name_check(allow_empty=True)),
    Option("surrogate_epochs", int, 0, "training epochs of the surrogate (0: the victim's --epochs)", check=non_negative),
]

# The original reads a ResNet-18 checkpoint it does not ship ("PGD best model"); the settings of
# the PGD that trained it survive only in the name of a commented-out checkpoint beside it
# (e8_a2_s10: eps 8/255, step 2/255, 10 steps), which is Madry et al.'s CIFAR-10 recipe, random
# start included. The optimiser, schedule and epochs are the victim's, like the standard surrogate's.
ADVERSARIAL_SURROGATE_OPTIONS = [
    Option("surrogate_at_eps", float, 8.0, "adversarial surrogate: L-inf bound of its training PGD, pixel units out of 255", check=within(0, 255)),
    Option("surrogate_at_step", float, 2.0, "adversarial surrogate: step size of its training PGD, pixel units out of 255", check=non_negative),
    Option("surrogate_at_steps", int, 10, "adversarial surrogate: PGD steps per training batch (training costs about steps+1 "
           "normal epochs per epoch)", check=non_negative),
    Option("surrogate_at_random_start", parse_bool, True,
           "adversarial surrogate: start each training PGD at a uniform random point of the eps-ball"),
    Option("surrogate_train_size", int, 0, "adversarial surrogate: train on this many of the victim's clean training "
           "images, a seeded random subset (0: all of them)", check=non_negative),
]

#: test images the adversarial surrogate's robust accuracy is reported on
ROBUST_EVAL_IMAGES = 1000


@dataclass
class Surrogate:
    model: torch.nn.Module  # in eval mode, on the device
    pipeline: engine.Pipeline
    identity: dict[str, Any]  # goes into the keys of the resources computed against it
    description: str


def get_surrogate(ctx, adversarial: bool = False) -> Surrogate:
    """`ctx` is the attack's `PrepareContext`. A named record wins; otherwise a standard or, with
    `adversarial`, an adversarially trained model (settings from `ADVERSARIAL_SURROGATE_OPTIONS`)."""
    cfg = ctx.cfg
    if cfg["surrogate_record"]:
        return _from_record(ctx)
    return _trained(ctx, _at_settings(cfg) if adversarial else None)


def _at_settings(cfg: dict) -> dict[str, Any]:
    at = {"eps": float(cfg["surrogate_at_eps"]), "step": float(cfg["surrogate_at_step"]),
          "steps": int(cfg["surrogate_at_steps"]), "random_start": bool(cfg["surrogate_at_random_start"])}
    adversarial.check_pgd_settings("surrogate_at", at["eps"], at["step"], at["steps"])
    if cfg["surrogate_train_size"] < 0:
        raise UserError(f"surrogate_train_size must be 0 or positive, got {cfg['surrogate_train_size']}")
    return at


def unnormalised(pipeline: engine.Pipeline) -> engine.Pipeline:
    """The same pipeline feeding the model pixels in [0, 1] (mean 0, std 1)."""
    return replace(pipeline, mean=torch.zeros_like(pipeline.mean), std=torch.ones_like(pipeline.std))


def adversarial_training_loss(eps: float, step: float, steps: int, random_start: bool,
                              gen: torch.Generator | None = None) -> engine.LossFn:
    """A `train_epoch` loss for PGD adversarial training: the batch (model input in [0, 1], from an
    unnormalised pipeline) is replaced by untargeted L-inf PGD examples against the model in its
    current (training) mode, and the loss is the cross-entropy on those. `eps`/`step` in units of
    the input range (8/255, 2/255); `gen` draws the random starts."""
    def loss_fn(model, x, y, idx):
        x = x.detach()
        start = None
        if random_start and steps > 0:
            noise = torch.rand(x.shape, device=x.device, generator=gen)
            start = (x + (2 * noise - 1) * eps).clamp_(0, 1)
        x_adv = adversarial.linf_pgd(model, x, y, eps, step, steps, 1.0, start)
        logits = model(x_adv)
        return F.cross_entropy(logits.float(), y), logits
    return loss_fn


def _from_record(ctx) -> Surrogate:
    cfg, info = ctx.cfg, ctx.info
    folder = Path(cfg["surrogate_record"])
    if not folder.is_absolute() and not folder.exists():
        folder = REPO_ROOT / folder
    record = load_record(folder)
    if record["dataset"] != info.name or record["image_size"] != info.image_size:
        raise UserError(f"surrogate record {folder} is for {record['dataset']} ({record['image_size']} px), "
                        f"not {info.name} ({info.image_size} px)")
    input_size = record.get("input_size") or info.image_size
    model = models.build_model(record["model_name"], record["num_classes"], record["in_channels"], input_size)
    load_state_dict_checked(model, record["model"], f"surrogate record {folder}")
    pipeline = engine.Pipeline.for_dataset(info, ctx.device, input_size)
    model = engine.place_model(model, pipeline, ctx.device).eval()
    identity = {"surrogate": "record", "model": record["model_name"], "weights": state_digest(record["model"])}
    return Surrogate(model, pipeline, identity, f"{record['model_name']} from {folder}")


def _trained(ctx, at: dict[str, Any] | None = None) -> Surrogate:
    cfg, info, device = ctx.cfg, ctx.info, ctx.device
    name = cfg["surrogate_model"] or cfg["model"]
    if not models.is_model_name(name):
        raise UserError(f"unknown surrogate_model {name!r}; choose one of: {', '.join(models.model_names())}")
    epochs = cfg["surrogate_epochs"] or cfg["epochs"]
    if epochs < 0:
        raise UserError(f"surrogate_epochs must be 0 or positive, got {cfg['surrogate_epochs']}")
    pipeline = engine.Pipeline.for_dataset(info, device, cfg.get("input_size") or None)
    key = {"dataset": info.name, "image_size": info.image_size, "input_size": pipeline.input_size,
           "seed": cfg["random_seed"], "model": name, "epochs": epochs, "lr": cfg["lr"],
           "batch_size": cfg["batch_size"], "momentum": cfg["sgd_momentum"], "wd": cfg["wd"],
           "lr_scheduler": cfg["lr_scheduler"], "train_subset": tensor_digest(ctx.train_indices),
           **precision_key(ctx.amp)}
    n_train = len(ctx.train.labels)
    chosen = None
    if at is not None:
        pipeline = unnormalised(pipeline)
        size = cfg["surrogate_train_size"]
        if 0 < size < n_train:
            gen = torch.Generator().manual_seed(engine.derive_seed(cfg["random_seed"], "surrogate-subset"))
            chosen = torch.randperm(n_train, generator=gen)[:size].sort().values
        # a separate key entry, so that a standard surrogate's key (and cache) stays as it was
        key["adversarial_training"] = {**at, "input": "unnormalised [0, 1]",
                                       "train_images": n_train if chosen is None else len(chosen)}
    resource = Resource("surrogate", key, ctx.resource_root)

    def build(progress):
        torch.manual_seed(engine.derive_seed(cfg["random_seed"], "surrogate-init"))
        model = engine.place_model(models.build_model(name, info.num_classes, info.channels, pipeline.input_size),
                                   pipeline, device)
        opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["sgd_momentum"], weight_decay=cfg["wd"])
        sched = engine.cosine_scheduler(opt, epochs) if cfg["lr_scheduler"] == "cosine" else None
        gen = engine.make_generator(cfg["random_seed"], device, "surrogate-order")
        start_gen = engine.make_generator(cfg["random_seed"], device, "surrogate-pgd-start")
        loss_fn = None
        if at is not None:
            loss_fn = adversarial_training_loss(at["eps"] / 255.0, at["step"] / 255.0, at["steps"],
                                                at["random_start"], start_gen)
        images, labels = ctx.train.images, ctx.train.labels
        if chosen is not None:
            images, labels = images[chosen], labels[chosen]
        images, labels = images.to(device), labels.to(device)
        first = 1
        state = progress.load()
        if state is not None:
            engine.load_states(state, model=model, optimizer=opt, scheduler=sched, generator=gen)
            if "start_generator" in state:
                start_gen.set_state(state["start_generator"])
            first = state["epoch"] + 1
        what = "adversarial surrogate" if at is not None else "surrogate"
        for epoch in tqdm(range(first, epochs + 1), desc=what, unit="ep", disable=not ctx.progress,
                          initial=first - 1, total=epochs, dynamic_ncols=True):
            stats = engine.train_epoch(model, images, labels, pipeline, opt, cfg["batch_size"], gen, loss_fn=loss_fn,
                                       amp=ctx.amp, desc=f"{what} epoch {epoch}", progress=ctx.progress)
            if sched is not None:
                sched.step()
            tqdm.write(f"{what} epoch {epoch}: loss {stats['train_loss']:.4f}  train_acc {stats['train_acc']:.4f}"
                       + ("  (on PGD examples)" if at is not None else ""))
            progress.save({"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict() if sched is not None else None,
                           "generator": gen.get_state(), "start_generator": start_gen.get_state()})
        test = ctx.test
        pred = engine.predict(model, test.images.to(device), pipeline, cfg.get("eval_batch_size", 0), ctx.amp)
        acc = float((pred.cpu() == test.labels.cpu()).float().mean()) if len(test.labels) else float("nan")
        info_out = {"clean_acc": round(acc, 4)}
        if at is not None:
            info_out["pgd_acc"] = round(_robust_accuracy(model, pipeline, test, at, device, ctx.amp), 4)
        return {"model": clean_state_dict(model.state_dict())}, info_out

    payload = resource.get(build)
    model = models.build_model(name, info.num_classes, info.channels, pipeline.input_size)
    load_state_dict_checked(model, payload["model"], f"surrogate cache {resource.folder}")
    model = engine.place_model(model, pipeline, device).eval()
    if at is None:
        identity = {"surrogate": "trained", **key, "weights": state_digest(payload["model"])}
        return Surrogate(model, pipeline, identity,
                         f"clean {name} trained for {epochs} epochs (C-Acc {resource.info.get('clean_acc')})")
    identity = {"surrogate": "adversarial", **key, "weights": state_digest(payload["model"])}
    return Surrogate(model, pipeline, identity,
                     f"{name} adversarially trained for {epochs} epochs on {key['adversarial_training']['train_images']} "
                     f"images (PGD eps {at['eps']:g}/255, step {at['step']:g}/255, {at['steps']} steps; "
                     f"C-Acc {resource.info.get('clean_acc')}, PGD acc {resource.info.get('pgd_acc')})")


def _robust_accuracy(model, pipeline: engine.Pipeline, test, at: dict[str, Any], device, amp) -> float:
    """Accuracy in eval mode on the first `ROBUST_EVAL_IMAGES` test images under the training PGD
    (from the clean image, so that the figure is reproducible)."""
    images, labels = test.images[:ROBUST_EVAL_IMAGES], test.labels[:ROBUST_EVAL_IMAGES]
    if len(labels) == 0:
        return float("nan")
    model.eval()
    correct = 0

    def forward(z):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return model(z)
    for start in range(0, len(labels), 256):
        x = pipeline.eval_batch(images[start:start + 256].to(device))
        y = labels[start:start + 256].to(device)
        x_adv = adversarial.linf_pgd(forward, x, y, at["eps"] / 255.0, at["step"] / 255.0, at["steps"], 1.0)
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            correct += int((model(x_adv).argmax(1) == y).sum())
    return correct / len(labels)
