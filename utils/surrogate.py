"""The model an attack computes its resources against (LC's PGD images, LF's universal pattern).

Either a record the user names (`--surrogate_record record/fmnist/badnet/pratio_0.0-...`), or a
clean model the toolkit trains on the victim's own clean training images, cached as a resource
(`surrogate` kind) and resumable per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import models
from utils import engine
from utils.config import Option, REPO_ROOT
from utils.errors import UserError
from utils.record import clean_state_dict, load_record, load_state_dict_checked
from utils.resources import RESOURCE_OPTIONS, Resource, precision_key, state_digest, tensor_digest

SURROGATE_OPTIONS = RESOURCE_OPTIONS + [
    Option("surrogate_record", str, "", "record folder whose model is the surrogate (empty: train a clean one)"),
    Option("surrogate_model", str, "", "architecture of the trained surrogate (empty: the victim's --model)"),
    Option("surrogate_epochs", int, 0, "training epochs of the surrogate (0: the victim's --epochs)"),
]


@dataclass
class Surrogate:
    model: torch.nn.Module  # in eval mode, on the device
    pipeline: engine.Pipeline
    identity: dict[str, Any]  # goes into the keys of the resources computed against it
    description: str


def get_surrogate(ctx) -> Surrogate:
    """`ctx` is the attack's `PrepareContext`."""
    cfg = ctx.cfg
    if cfg["surrogate_record"]:
        return _from_record(ctx)
    return _trained(ctx)


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


def _trained(ctx) -> Surrogate:
    cfg, info, device = ctx.cfg, ctx.info, ctx.device
    name = cfg["surrogate_model"] or cfg["model"]
    if name not in models.model_names():
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
    resource = Resource("surrogate", key, ctx.resource_root)

    def build(progress):
        torch.manual_seed(engine.derive_seed(cfg["random_seed"], "surrogate-init"))
        model = engine.place_model(models.build_model(name, info.num_classes, info.channels, pipeline.input_size),
                                   pipeline, device)
        opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["sgd_momentum"], weight_decay=cfg["wd"])
        sched = engine.cosine_scheduler(opt, epochs) if cfg["lr_scheduler"] == "cosine" else None
        gen = engine.make_generator(cfg["random_seed"], device, "surrogate-order")
        images, labels = ctx.train.images.to(device), ctx.train.labels.to(device)
        first = 1
        state = progress.load()
        if state is not None:
            engine.load_states(state, model=model, optimizer=opt, scheduler=sched, generator=gen)
            first = state["epoch"] + 1
        for epoch in tqdm(range(first, epochs + 1), desc="surrogate", unit="ep", disable=not ctx.progress,
                          initial=first - 1, total=epochs, dynamic_ncols=True):
            stats = engine.train_epoch(model, images, labels, pipeline, opt, cfg["batch_size"], gen, amp=ctx.amp,
                                       desc=f"surrogate epoch {epoch}", progress=ctx.progress)
            if sched is not None:
                sched.step()
            tqdm.write(f"surrogate epoch {epoch}: loss {stats['train_loss']:.4f}  train_acc {stats['train_acc']:.4f}")
            progress.save({"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict() if sched is not None else None,
                           "generator": gen.get_state()})
        test = ctx.test
        pred = engine.predict(model, test.images.to(device), pipeline, cfg.get("eval_batch_size", 0), ctx.amp)
        acc = float((pred.cpu() == test.labels.cpu()).float().mean()) if len(test.labels) else float("nan")
        return {"model": clean_state_dict(model.state_dict())}, {"clean_acc": round(acc, 4)}

    payload = resource.get(build)
    model = models.build_model(name, info.num_classes, info.channels, pipeline.input_size)
    load_state_dict_checked(model, payload["model"], f"surrogate cache {resource.folder}")
    model = engine.place_model(model, pipeline, device).eval()
    identity = {"surrogate": "trained", **key, "weights": state_digest(payload["model"])}
    return Surrogate(model, pipeline, identity,
                     f"clean {name} trained for {epochs} epochs (C-Acc {resource.info.get('clean_acc')})")
