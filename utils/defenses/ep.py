"""EP, exact purification: the reference defense of the NeurIPS 2024 post-purification robustness paper
(Min et al., "Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor Defense").

EP knows the backdoor exactly: it fine-tunes every parameter on the clean tuning set together with the
record's real poisoned training images carrying their true labels, so the trigger is unlearnt
directly; the paper uses it as the upper reference for post-purification robustness. The official
repository ships no EP code, so the fine-tuning settings are those of the FT baseline (the dataset's
split, epochs and learning rate, SGD momentum 0.9, cosine schedule).

Not BackdoorBench's `ep`: that name there is an unrelated pruning defense.
"""
from __future__ import annotations

import torch

from utils import engine
from utils.config import Option, non_negative
from utils.defenses.purify import FINETUNE, Mode, purify, register_mode


def ep_training_set(tuning) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The clean tuning images and labels followed by the poisoned samples with their true labels (all
    of them, or `ep_poison_num` drawn with a generator derived from the seed). Returns the images, the
    labels and how many poisoned samples joined."""
    poisoned = tuning.poisoned
    count = tuning.option("ep_poison_num")
    images, labels = poisoned.images, poisoned.true_labels
    if 0 < count < len(images):
        gen = torch.Generator().manual_seed(engine.derive_seed(tuning.settings.seed, "ep-poisoned"))
        pick = torch.randperm(len(images), generator=gen)[:count].sort().values.to(images.device)
        images, labels = images[pick], labels[pick]
    images = torch.cat([tuning.images, images.to(tuning.images.device)])
    labels = torch.cat([tuning.labels, labels.to(tuning.labels.device)])
    return images, labels, len(labels) - len(tuning.labels)


def _ep(model, mode: Mode, tuning):
    images, labels, added = ep_training_set(tuning)
    print(f"[ep] fine-tuning on {len(tuning.labels)} clean + {added} poisoned images with their true labels")
    tuning.result["ep"] = {"clean_images": len(tuning.labels), "poisoned_images": added}
    return purify(model, FINETUNE, images, labels, tuning.pipeline, tuning.settings, tuning.evaluate, tuning.amp)


EP_OPTIONS = (
    Option("ep_poison_num", int, 0, "ep: how many of the record's poisoned training samples (with their true labels) join "
           "the clean tuning set (default 0 = all of them)", check=non_negative),
)

register_mode(Mode("ep", "EP", False, "all", False,
                   "exact purification (Min et al. 2024): fine-tuning on the clean tuning set plus the record's poisoned "
                   "training samples with their true labels (not BackdoorBench's pruning defense of that name)",
                   algorithm=_ep, needs_poisoned=True, options=EP_OPTIONS))
