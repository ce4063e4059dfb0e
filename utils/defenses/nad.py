"""NAD, neural attention distillation (Li et al., ICLR 2021), as BackdoorBench runs it (`defense/nad.py`).

A teacher is fine-tuned from the backdoored model on the clean tuning set; then the backdoored model
(the student) is fine-tuned again with CE plus, for each chosen stage i, beta_i times the MSE between
the student's and the teacher's attention maps on the same batch. An attention map is
sum over channels of |activation|^p, flattened and L2-normalised (eps 1e-6), as the official `AT`
module. The stages come from the model registry (`models.stages`: ResNets layer2/3/4, ...); the
betas weigh the model's last len(betas) stages.

BackdoorBench's CIFAR-10 settings (config/defense/nad/cifar10.yaml, the same for GTSRB, CIFAR-100
and Tiny): 5% split, batch 256, SGD lr 0.01 momentum 0.9 wd 5e-4, teacher 10 epochs, student 10
epochs (`te_epochs` for both), betas 500/1000/1000, p 2. The student's lr is constant (its
`adjust_learning_rate` keeps 0.01 for the first 20 epochs).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from models import StageTap, stages
from utils.config import Option, positive
from utils.defenses.purify import FINETUNE, Mode, StepHooks, purify, register_mode
from utils.errors import UserError

#: the teacher's and the student's fine-tuning phases: every parameter trains, constant lr
TEACHER = dataclasses.replace(FINETUNE, name="nad-teacher", schedule="constant")
STUDENT = dataclasses.replace(FINETUNE, name="nad", schedule="constant")


def parse_betas(text: str) -> list[float]:
    """'500,1000,1000' -> [500.0, 1000.0, 1000.0] (commas or spaces)."""
    return [float(part) for part in str(text).replace(",", " ").split()]


def _betas_problem(text) -> str | None:
    try:
        betas = parse_betas(text)
    except ValueError:
        return "must be a comma-separated list of numbers"
    if not betas or any(not (b >= 0 and b < float("inf")) for b in betas):
        return "must be a non-empty comma-separated list of finite numbers >= 0"
    return None


OPTIONS = (
    Option("nad_teacher_epochs", int, 10, "nad: fine-tuning epochs of the teacher (default 10, BackdoorBench's te_epochs)", check=positive),
    Option("nad_teacher_lr", float, 0.01, "nad: learning rate of the teacher, constant (default 0.01)", check=positive),
    Option("nad_betas", str, "500,1000,1000", "nad: weights of the attention terms of the model's last stages, shallow to deep (default 500,1000,1000)", check=_betas_problem),
    Option("nad_p", float, 2.0, "nad: power of |activation| in the attention map (default 2)", check=positive),
)


def attention_map(maps: torch.Tensor, p: float) -> torch.Tensor:
    """(N, C, h, w) -> (N, h*w): sum over channels of |a|^p, L2-normalised per sample (official AT)."""
    am = maps.float().abs().pow(p).sum(dim=1).flatten(1)
    return am / (am.norm(dim=1, keepdim=True) + 1e-6)


def attention_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], betas: list[float], p: float) -> torch.Tensor:
    """sum_i beta_i * MSE(attention(student_i), attention(teacher_i)) over the last len(betas)
    stages (all of them when the model has fewer)."""
    k = min(len(betas), len(student))
    pairs = zip(betas[len(betas) - k:], student[len(student) - k:], teacher[len(teacher) - k:])
    return sum(beta * F.mse_loss(attention_map(s, p), attention_map(t, p)) for beta, s, t in pairs)


def nad(model: nn.Module, mode: Mode, tuning):
    """Teacher fine-tuning, then the student's distillation; rows are the student's epochs."""
    if not callable(getattr(model, "feature_maps", None)):
        raise UserError(f"--ft_mode nad needs a registry model (feature maps and stages); {type(model).__name__} has none")
    settings = tuning.settings
    betas, p = parse_betas(tuning.option("nad_betas")), float(tuning.option("nad_p"))
    teacher_settings = dataclasses.replace(settings, epochs=tuning.option("nad_teacher_epochs"),
                                           lr=tuning.option("nad_teacher_lr"), eval_every=10 ** 9)
    teacher, teacher_rows = purify(model, TEACHER, tuning.images, tuning.labels, tuning.pipeline, teacher_settings,
                                   tuning.evaluate, tuning.amp)
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    tuning.result["nad_teacher"] = {k: teacher_rows[-1][k] for k in ("clean_acc", "asr", "ra")}
    print(f"[nad] teacher after {teacher_settings.epochs} epochs: C-Acc {teacher_rows[-1]['clean_acc']:.4f}  "
          f"ASR {teacher_rows[-1]['asr']:.4f}", flush=True)
    student, rows = distill(model, teacher, tuning, betas, p)
    return student, rows


def distill(model: nn.Module, teacher: nn.Module, tuning, betas: list[float], p: float):
    """The student phase: the shared loop (STUDENT) with the attention term as extra loss. The stage
    outputs of the student come from its own forward pass of each step (a `StageTap`)."""
    tap = StageTap(model)
    student = None

    def attention_term(net, x, y, logits):
        own = tap.latest() if tap.modules else [net.feature_maps(x)]
        with torch.no_grad():
            theirs = stages(teacher, x)
        return attention_loss(own, [t.detach() for t in theirs], betas, p)

    try:
        student, rows = purify(model, STUDENT, tuning.images, tuning.labels, tuning.pipeline, tuning.settings,
                               tuning.evaluate, tuning.amp, hooks=StepHooks(extra_loss=attention_term))
    finally:
        tap.remove(*([student] if student is not None else []))
    return student, rows


register_mode(Mode("nad", "NAD", False, "all", False,
                   "neural attention distillation: a fine-tuned teacher's attention maps guide the fine-tuning (NAD)",
                   algorithm=nad, options=OPTIONS, schedule="constant",
                   defaults=(("split_ratio", 0.05), ("epochs", 10), ("lr", 0.01), ("batch_size", 256), ("wd", 5e-4),
                             ("momentum", 0.9)),
                   # BackdoorBench's config/defense/nad/tiny.yaml: batch 128 (its 200 epochs and
                   # ReduceLROnPlateau do not reach NAD, whose two phases run te_epochs at a constant lr)
                   dataset_defaults=(("tiny", (("batch_size", 128),)),)))
