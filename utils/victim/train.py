"""Training a victim and writing its record: the driver behind every attack entry script, with
resumption from the last finished epoch."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from utils import attacks, engine
from utils.config import dump_yaml
from utils.engine.runtime import device_name, to_cpu, versions
from utils.errors import UserError
from utils.record.layout import CHECKPOINT_FILE, CONFIG_FILE, FORMAT, FORMAT_VERSION, METRICS_FILE, RECORD_FILE, SUMMARY_FILE, record_path
from utils.record.lock import LostLock
from utils.record.store import (
    StagedFolder,
    clean_state_dict,
    load_torch_file,
    portable_path,
    save_torch,
    write_csv,
    write_json,
    write_text,
)
from utils.victim.experiment import (
    build_model_for,
    evaluate_experiment,
    parse_attack_config,
    prepare_experiment,
    refresh_trigger,
    validate_config,
)


def run_attack(attack: str, argv: Sequence[str] | None = None) -> Path:
    """Entry point of every attack script. Returns the record folder."""
    cfg = parse_attack_config(attack, argv)
    info = validate_config(cfg)
    spec = attacks.get_attack(attack)
    folder = record_path(cfg["record_root"], cfg["dataset"], attack, cfg["pratio"], cfg["attack_target"], cfg["model"])
    # from here to commit this run owns the record folder and its resumable stage `.NAME.partial`
    staged = StagedFolder(folder, cfg["overwrite"], "record", RECORD_FILE, resumable=True)
    try:
        _train_and_record(cfg, info, spec, staged)
        staged.commit()
    except LostLock:
        staged.release()  # the stage is the new owner's now: leave it alone
        raise
    except BaseException:
        if (staged.stage / CHECKPOINT_FILE).exists():
            print(f"\nrun stopped; its last finished epoch is kept in {staged.stage}: "
                  "run the same command again to resume", file=sys.stderr)
            staged.release()
        else:
            staged.abort()
        raise
    print(f"record written to {folder}")
    return folder


#: settings that may change between a killed run and its resumption
_RESUME_FREE_KEYS = ("overwrite", "progress", "device", "eval_batch_size")


def _resume_key(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in _RESUME_FREE_KEYS}


_CHECKPOINT_KEYS = ("config", "epoch", "rows", "seconds", "model", "optimizer", "scheduler", "generator", "torch_rng",
                    "hooks")


def _load_checkpoint(stage: Path, cfg: dict) -> dict | None:
    """The checkpoint of an earlier, killed run of the same configuration, if any."""
    path = stage / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        ckpt = load_torch_file(path, "checkpoint")
    except UserError as err:
        print(f"ignoring unreadable checkpoint: {err}", file=sys.stderr)
        path.unlink(missing_ok=True)  # this run owns the stage: an unusable file must not block the next one
        return None
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in _CHECKPOINT_KEYS):
        print(f"ignoring {path}: it loads, but is not a checkpoint of this toolkit "
              f"({type(ckpt).__name__}); training starts afresh", file=sys.stderr)
        path.unlink(missing_ok=True)
        return None
    if ckpt.get("config") != _resume_key(cfg):
        print(f"ignoring {path}: it belongs to a run with other settings", file=sys.stderr)
        return None
    return ckpt


def _train_and_record(cfg, info, spec, staged: StagedFolder) -> None:
    engine.configure_threads()
    device = engine.resolve_device(cfg["device"])
    amp = engine.amp_dtype(cfg["amp"], device)
    engine.seed_everything(cfg["random_seed"])
    exp = prepare_experiment(cfg, info, device)
    input_size = exp.pipeline.input_size
    model = engine.place_model(build_model_for(cfg["model"], info, input_size, cfg["pretrained"]), exp.pipeline, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["sgd_momentum"], weight_decay=cfg["wd"])
    scheduler = engine.cosine_scheduler(optimizer, cfg["epochs"]) if cfg["lr_scheduler"] == "cosine" else None
    gen = engine.make_generator(cfg["random_seed"], device, "train-order")
    hooks = spec.training(cfg, model, exp) if spec.training is not None else None
    hook_state = (hooks.state or {}) if hooks is not None else {}
    n_poison = int(exp.train.poison_mask.sum())
    print(f"{spec.name} on {info.name}/{cfg['model']}: {len(exp.train.labels)} training images, {n_poison} poisoned "
          f"(pratio {cfg['pratio']}), {len(exp.clean_test.labels)} clean / {len(exp.bd_test.targets)} backdoor test images, "
          f"device {device_name(device)}, amp {amp}", flush=True)
    rows, first_epoch, spent = [], 1, 0.0
    ckpt = _load_checkpoint(staged.stage, cfg)
    if ckpt is not None:
        engine.load_states(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, generator=gen)
        torch.set_rng_state(ckpt["torch_rng"])
        for name, obj in hook_state.items():
            obj.load_state_dict(ckpt["hooks"][name])
        rows, first_epoch, spent = ckpt["rows"], ckpt["epoch"] + 1, ckpt["seconds"]
        if hooks is not None and hooks.trigger_params is not None:
            refresh_trigger(exp, spec, cfg, hooks.trigger_params())
        print(f"resuming after epoch {ckpt['epoch']} from {staged.stage / CHECKPOINT_FILE}", flush=True)
    start = time.perf_counter() - spent
    epochs = range(first_epoch, cfg["epochs"] + 1)
    bar = tqdm(epochs, desc="epochs", unit="ep", disable=not cfg["progress"], dynamic_ncols=True)
    metrics = {}
    for epoch in bar:
        lr = optimizer.param_groups[0]["lr"]
        stats = engine.train_epoch(model, exp.train.images, exp.train.labels, exp.pipeline, optimizer,
                                   cfg["batch_size"], gen, amp=amp, desc=f"epoch {epoch}", progress=cfg["progress"],
                                   loss_fn=hooks.loss_fn if hooks else None,
                                   after_step=hooks.after_step if hooks else None,
                                   augment=hooks.augment if hooks else True, drop_last=True)
        if scheduler is not None:
            scheduler.step()
        if hooks is not None and hooks.trigger_params is not None:
            refresh_trigger(exp, spec, cfg, hooks.trigger_params())
        metrics = evaluate_experiment(model, exp, cfg["eval_batch_size"], amp)
        row = {"epoch": epoch, "lr": lr, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"], **metrics,
               "img_per_s": stats["img_per_s"]}
        rows.append(row)
        tqdm.write(f"epoch {epoch:3d}  lr {lr:.4g}  loss {stats['train_loss']:.4f}  train_acc {stats['train_acc']:.4f}  "
                   f"C-Acc {metrics['clean_acc']:.4f}  ASR {metrics['asr']:.4f}  RA {metrics['ra']:.4f}  "
                   f"({stats['img_per_s']:.0f} img/s)", file=sys.stdout)
        staged.check_owner()  # never write into a stage another run has taken over
        write_csv(staged.stage / METRICS_FILE, rows)
        save_torch(staged.stage / CHECKPOINT_FILE, {
            "config": _resume_key(cfg), "epoch": epoch, "rows": rows, "seconds": time.perf_counter() - start,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "hooks": {name: obj.state_dict() for name, obj in hook_state.items()}})
    seconds = time.perf_counter() - start
    metrics = {k: rows[-1][k] for k in ("clean_acc", "asr", "ra")} if rows else metrics
    payload = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "model_name": cfg["model"], "num_classes": info.num_classes, "in_channels": info.channels,
        "image_size": info.image_size, "input_size": input_size,
        "dataset": info.name, "attack": spec.name, "clean_label": spec.clean_label,
        "attack_target": cfg["attack_target"], "attack_label_trans": cfg["attack_label_trans"],
        "pratio": cfg["pratio"], "random_seed": cfg["random_seed"],
        "poison_indices": exp.poison_indices.cpu(), "batch_poisoning": spec.batch_poisoning,
        "train_indices": exp.train_indices, "test_indices": exp.test_indices,
        "trigger": to_cpu(exp.trigger_params),
        "model": clean_state_dict(model.state_dict()),
    }
    save_torch(staged.stage / RECORD_FILE, payload)
    write_text(staged.stage / CONFIG_FILE, dump_yaml(
        {k: exp.dataset_path if k == "dataset_path" else portable_path(v) if k == "record_root" else v for k, v in cfg.items()}))
    write_csv(staged.stage / METRICS_FILE, rows)
    (staged.stage / CHECKPOINT_FILE).unlink(missing_ok=True)
    write_json(staged.stage / SUMMARY_FILE, {
        "clean_acc": metrics.get("clean_acc"), "asr": metrics.get("asr"), "ra": metrics.get("ra"),
        "epochs": cfg["epochs"], "seconds": round(seconds, 2),
        "train_img_per_s": round(sum(r["img_per_s"] for r in rows) / max(len(rows), 1), 1),
        "poisoned": n_poison, "train_size": len(exp.train.labels),
        "device": device_name(device), "amp": str(amp), "versions": versions(),
        **({"attack_info": exp.trigger_params["info"]} if isinstance(exp.trigger_params.get("info"), dict) else {}),
    })
