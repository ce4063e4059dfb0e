"""Label-consistent backdoor (LC, docs/protocol.md §4; Turner et al. 2019), clean label.

Poisoned images are chosen from the target class only and keep their label. Each is first replaced
by an adversarial version that a separately trained model (the surrogate, `utils.attacks.surrogate`)
misclassifies, so that its own content stops explaining its label and the network leans on the
trigger instead; then the original's 3x3 +-255 pattern (`CORNER_SIGNS_32`, close to but not a
checkerboard) is added in all four corners and clipped. Test images get the corner pattern only.

The surrogate is adversarially trained by default (`lc_surrogate: adversarial`, as the original's
PGD-trained ResNet-18 on unnormalised input); `lc_surrogate: standard` computes the images against
a clean model instead, whose perturbations mostly leave the image's content intact.

Resource step: untargeted L-inf PGD (maximise the surrogate's cross-entropy on the true label,
from the clean image, no random start) on EVERY target-class image of the victim's training set,
cached as the `lc_pgd` resource. Its key holds the dataset, image size, seed, target, PGD
settings, the surrogate's identity and the training subset, not the poisoning ratio, so runs
with another --pratio reuse it. The record keeps only the chosen images (and their indices), so
a record rebuilds its poisoned training set without the cache or the surrogate.

Units: `lc_eps` and `lc_step` are in pixel units out of 255 (8 means 8/255).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from utils.attacks import adversarial, triggers
from utils.attacks.registry import AttackSpec, register_attack
from utils.attacks.surrogate import (
    ADVERSARIAL_SURROGATE_OPTIONS,
    SURROGATE_OPTIONS,
    get_surrogate,
)
from utils.config import Option, non_negative, positive, within
from utils.data.datasets import DatasetInfo
from utils.errors import UserError
from utils.record.resources import Resource, precision_key, tensor_digest

#: images per PGD chunk; the cache saves its progress after each one
PGD_CHUNK = 256

LC_OPTIONS = [
    Option("reduced_amplitude", float, 1.0, "amplitude of the corner checkerboard as a fraction of 255 (1: +-255)", check=within(0, 1, low_open=True)),
    Option("lc_eps", float, 8.0, "L-inf bound of the PGD images in pixel units out of 255 (8 = 8/255)", check=within(0, 255)),
    Option("lc_step", float, 1.5, "PGD step size in pixel units out of 255 (1.5 = 1.5/255)", check=positive),
    Option("lc_steps", int, 100, "PGD steps (0: the clean target-class images, i.e. no adversarial part)", check=non_negative),
    Option("lc_surrogate", str, "adversarial", "the model the PGD images are computed against: an adversarially trained "
           "one (the original's; settings surrogate_at_*) or a standard clean one", choices=("adversarial", "standard")),
] + SURROGATE_OPTIONS + ADVERSARIAL_SURROGATE_OPTIONS


#: Signs of the original all-corners trigger on its 32 x 32 grid, (row, column) -> +-1. It is not a
#: mirrored checkerboard: the pixels (0, 2), (0, 29), (29, 2) and (29, 29) are -1, and the bottom-left
#: block repeats the top-left one instead of mirroring it.
CORNER_SIGNS_32 = {
    (0, 0): 1, (0, 1): -1, (0, 2): -1, (1, 0): -1, (1, 1): 1, (1, 2): -1, (2, 0): 1, (2, 1): -1, (2, 2): 1,
    (29, 0): 1, (29, 1): -1, (29, 2): -1, (30, 0): -1, (30, 1): 1, (30, 2): -1, (31, 0): 1, (31, 1): -1, (31, 2): 1,
    (0, 29): -1, (0, 30): -1, (0, 31): 1, (1, 29): -1, (1, 30): 1, (1, 31): -1, (2, 29): 1, (2, 30): -1, (2, 31): 1,
    (29, 29): -1, (29, 30): -1, (29, 31): 1, (30, 29): -1, (30, 30): 1, (30, 31): -1, (31, 29): 1, (31, 30): -1,
    (31, 31): 1,
}


def corner_pattern(channels: int, size: int, amplitude: float) -> torch.Tensor:
    """Float (C, H, W): the original's +-amplitude corner pattern (`CORNER_SIGNS_32`), zero elsewhere.
    Other image sizes get the 32 px grid resized with nearest-neighbour sampling, as the original
    does: 64 px doubles every pixel, while at 28 px the samples fall on source rows and columns
    0-2 and 29-30, so the top-left block stays 3 x 3 and the blocks on the bottom and right edges
    lose their outermost row or column."""
    grid = torch.zeros(32, 32)
    for (row, col), sign in CORNER_SIGNS_32.items():
        grid[row, col] = sign
    if size != 32:
        grid = F.interpolate(grid[None, None], size=(size, size), mode="nearest")[0, 0]
    return (grid * amplitude).expand(channels, size, size).clone()


def _check(cfg: dict) -> None:
    if not 0.0 < cfg["reduced_amplitude"] <= 1.0:
        raise UserError(f"reduced_amplitude must be within (0, 1], got {cfg['reduced_amplitude']}")
    adversarial.check_pgd_settings("lc", cfg["lc_eps"], cfg["lc_step"], cfg["lc_steps"])


def _build(cfg: dict, info: DatasetInfo) -> dict:
    _check(cfg)
    return {"pattern": corner_pattern(info.channels, info.image_size, 255.0 * cfg["reduced_amplitude"])}


def _apply(images: torch.Tensor, params: dict, train: bool) -> torch.Tensor:
    """The corner pattern only (test time, and training when no index is known)."""
    return triggers.apply_additive(images, params["pattern"])


def _train_apply(images: torch.Tensor, indices: torch.Tensor, params: dict) -> torch.Tensor:
    """The stored adversarial image of each training index, plus the corner pattern."""
    if len(indices) == 0:
        return images
    known = params["adv_indices"].to(indices.device)
    pos = torch.searchsorted(known, indices).clamp_(max=max(len(known) - 1, 0))
    if len(known) == 0 or not bool((known[pos] == indices).all()):
        missing = indices[known[pos] != indices] if len(known) else indices
        raise UserError(f"the LC trigger holds no adversarial image for training index {int(missing[0])}; "
                        "the record and its poisoned indices do not belong together")
    adv = params["adv_images"].to(images.device)[pos.to(images.device)]
    if adv.shape[1:] != images.shape[1:]:
        raise UserError(f"the LC adversarial images are {tuple(adv.shape[1:])}, the data {tuple(images.shape[1:])}")
    return triggers.apply_additive(adv, params["pattern"])


def _prepare(ctx) -> dict:
    cfg, info = ctx.cfg, ctx.info
    target, eps, step, steps = cfg["attack_target"], float(cfg["lc_eps"]), float(cfg["lc_step"]), cfg["lc_steps"]
    empty = {"adv_images": torch.empty(0, info.channels, info.image_size, info.image_size, dtype=torch.uint8),
             "adv_indices": torch.empty(0, dtype=torch.long)}
    if len(ctx.poison_indices) == 0:
        return {**empty, "info": {"pgd": "skipped: no poisoned images"}}
    surrogate = get_surrogate(ctx, adversarial=cfg["lc_surrogate"] == "adversarial")
    pool = (ctx.train.labels.cpu() == target).nonzero().flatten()
    key = {"dataset": info.name, "image_size": info.image_size, "seed": cfg["random_seed"], "target": target,
           "eps": eps, "step": step, "steps": steps, "surrogate": surrogate.identity,
           "train_subset": tensor_digest(ctx.train_indices), **precision_key(ctx.amp)}
    resource = Resource("lc_pgd", key, ctx.resource_root)

    def build(progress):
        clean = ctx.train.images[pool]
        labels = ctx.train.labels[pool]
        adv = torch.empty_like(clean)
        done = 0
        state = progress.load()
        if state is not None and state["adv"].shape[1:] == clean.shape[1:] and state["done"] <= len(pool):
            done = state["done"]
            adv[:done] = state["adv"]
        bar = tqdm(total=len(pool), initial=done, desc="lc pgd", unit="img", disable=not ctx.progress,
                   dynamic_ncols=True)
        for start in range(done, len(pool), PGD_CHUNK):
            stop = min(start + PGD_CHUNK, len(pool))
            out = adversarial.pgd_untargeted(surrogate, clean[start:stop].to(ctx.device),
                                             labels[start:stop].to(ctx.device), eps, step, steps, ctx.amp)
            adv[start:stop] = out.cpu()
            progress.save({"done": stop, "adv": adv[:stop].clone()})
            bar.update(stop - start)
        bar.close()
        acc_clean = float((adversarial.surrogate_predict(surrogate, clean, ctx.device, ctx.amp) == labels).float().mean())
        acc_adv = float((adversarial.surrogate_predict(surrogate, adv, ctx.device, ctx.amp) == labels).float().mean())
        linf = int((adv.int() - clean.int()).abs().max()) if len(pool) else 0
        return ({"images": adv, "indices": pool.clone()},
                {"target_images": len(pool), "surrogate_acc_clean": round(acc_clean, 4),
                 "surrogate_acc_adv": round(acc_adv, 4), "max_change_px": linf})

    payload = resource.get(build)
    stored = payload["indices"]
    chosen = ctx.poison_indices.cpu().sort().values
    pos = torch.searchsorted(stored, chosen).clamp_(max=max(len(stored) - 1, 0))
    if len(stored) == 0 or not bool((stored[pos] == chosen).all()):
        raise UserError(f"poisoned index outside target class {target}: LC is clean-label")
    info_out = {
        "surrogate": surrogate.description,
        "pgd": f"untargeted L-inf PGD, eps {eps:g}/255, step {step:g}/255, {steps} steps",
        **{k: resource.info[k] for k in ("target_images", "surrogate_acc_clean", "surrogate_acc_adv", "max_change_px")
           if k in resource.info},
    }
    return {"adv_images": payload["images"][pos].clone(), "adv_indices": chosen.clone(), "info": info_out}


LC = register_attack(AttackSpec(
    name="lc", title="LC", options=LC_OPTIONS, build=_build, apply=_apply, clean_label=True, prepare=_prepare,
    train_apply=_train_apply,
    description="clean-label: target-class images replaced by PGD images against a surrogate, "
                "+-255 3x3 patterns in the four corners",
))
