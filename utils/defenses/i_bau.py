"""i-BAU, implicit backdoor adversarial unlearning (Zeng et al., ICLR 2022), as BackdoorBench's
`defense/i-bau.py` and the official repository (YiZeng623/I-BAU) run it.

The defense solves min_theta max_delta L(theta, x + delta) over one universal perturbation delta.
Each round (`--epochs`, default 5 = the official n_rounds):

1. inner maximisation: delta starts at 0 (shape 1 x C x H x W, in the model's normalised input space,
   as BackdoorBench adds it to normalised images) and takes one SGD step (lr 10) per batch of the
   tuning set on -CE(f(x + delta), f(x).argmax) + 0.001 ||delta||^2, then is projected into the ball
   ||delta * std|| <= bound, the bound in pixel units ([0, 1] scale) as in the official code, whose
   images are not normalised (L2 by default, radius 10 as the official notebook; see `ibau_projection`);
2. outer minimisation, one Adam step per stored batch (the tuning set batched and augmented once, as
   the official code keeps its list of batches) of the CE on the batch with delta added to a random
   `ibau_portion` (official 0.01) of its images, with the implicit hypergradient through the inner
   problem's fixed point.

The hypergradient (`fixed_point_hypergradient`): with the inner problem's fixed-point map
Phi(delta, theta) = delta - 0.1 * grad_delta L_in(delta, theta) (L_in: -CE + 0.001 ||delta||^2 on
the first stored batch with its true labels, as officially) and the outer loss E(delta, theta), the
implicit function theorem gives

    dE/dtheta = dE/dtheta|direct + (dPhi/dtheta)^T (I - dPhi/ddelta)^-T dE/ddelta,

and the inverse is approximated, as the official `hypergrad.fixed_point`, by K steps of the
fixed-point iteration v <- (dPhi/ddelta)^T v + dE/ddelta from v = 0 (a truncated Neumann series),
with Jacobian-vector products from autograd. The model stays in eval mode throughout (officially
`model.eval()` before the defense).
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from utils import engine
from utils.config import Option, non_negative, positive, within
from utils.defenses.purify import Mode, register_mode

#: official constants: SGD step of the perturbation, step of the fixed-point map, weight of ||delta||^2
PERTURB_LR = 10.0
FIXED_POINT_LR = 0.1
NORM_PENALTY = 0.001

IBAU_OPTIONS = (
    Option("ibau_K", int, 5, "i-bau: fixed-point iterations of the implicit hypergradient (default 5)", check=positive),
    Option("ibau_norm", str, "l2", "i-bau: norm of the perturbation bound (default l2, as officially)", choices=("l2", "linf")),
    Option("ibau_bound", float, 10.0, "i-bau: radius of the perturbation in pixel units, [0, 1] scale (default 10, the official "
           "notebook's L2 radius; 0 = unbounded, as BackdoorBench's shipped code)", check=non_negative),
    Option("ibau_projection", str, "step", "i-bau: project the perturbation after every inner step (step, default: the bound holds "
           "throughout) or once after the inner loop (end, the official notebook)", choices=("step", "end")),
    Option("ibau_portion", float, 0.01, "i-bau: share of each outer batch that gets the perturbation (default 0.01, official)",
           check=within(0, 1)),
)

Tensors = Sequence[torch.Tensor]


def _grads(output: torch.Tensor | Tensors, inputs: Tensors, grad_outputs=None, retain_graph: bool = False,
           create_graph: bool = False) -> list[torch.Tensor]:
    """autograd.grad with zeros for the inputs that `output` does not depend on."""
    grads = torch.autograd.grad(output, list(inputs), grad_outputs=grad_outputs, retain_graph=retain_graph,
                                create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def fixed_point_hypergradient(inner: Tensors, outer: Tensors, K: int,
                              fp_map: Callable[[list[torch.Tensor], Tensors], list[torch.Tensor]],
                              outer_loss: Callable[[list[torch.Tensor], Tensors], torch.Tensor],
                              tol: float = 1e-10) -> list[torch.Tensor]:
    """The gradient of `outer_loss(w*, lambda)` with respect to the outer variables `outer`, where
    `inner` is (approximately) a fixed point w* = fp_map(w*, lambda). The inverse (I - J)^-T of the
    fixed-point Jacobian J = dfp_map/dw is applied by K steps of v <- J^T v + dE/dw from v = 0 (earlier
    when an update changes v by less than `tol`); the result is dE/dlambda + (dfp_map/dlambda)^T v.
    `fp_map` must build its graph (create_graph=True for the gradients it takes)."""
    inner = [w.detach().requires_grad_(True) for w in inner]
    loss = outer_loss(inner, outer)
    dE_dw = _grads(loss, inner, retain_graph=True)
    dE_dl = _grads(loss, outer)
    mapped = fp_map(inner, outer)
    v = [torch.zeros_like(w) for w in inner]
    for _ in range(K):
        jv = _grads(mapped, inner, grad_outputs=v, retain_graph=True)
        new = [a + b for a, b in zip(jv, dE_dw)]
        change = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(new, v)))
        v = new
        if float(change) < tol:
            break
    implicit = _grads(mapped, outer, grad_outputs=v)
    return [a + b for a, b in zip(implicit, dE_dl)]


def pixel_norm(delta: torch.Tensor, norm: str, scale: torch.Tensor | None = None) -> float:
    """The size of a perturbation of the normalised input in pixel units ([0, 1] scale): delta * std."""
    pixels = delta if scale is None else delta * scale
    return float(pixels.abs().max() if norm == "linf" else pixels.norm())


def project(delta: torch.Tensor, norm: str, bound: float, scale: torch.Tensor | None = None) -> None:
    """In place into {||delta * scale|| <= bound} (bound 0: no constraint). `scale` is the per-channel
    std of the normalisation, so that the bound is in pixel units as in the official code while delta
    lives in the normalised space as in BackdoorBench. L2: radial scaling (the official rule, the
    projection onto the ball when scale is 1); Linf: the per-channel clamp."""
    if bound <= 0:
        return
    with torch.no_grad():
        if norm == "linf":
            if scale is None:
                delta.clamp_(-bound, bound)
            else:
                limit = (bound / scale).to(delta.dtype)
                delta.copy_(torch.maximum(torch.minimum(delta, limit), -limit))
        else:
            delta.mul_(min(1.0, bound / max(pixel_norm(delta, norm, scale), 1e-12)))


def universal_perturbation(model: nn.Module, batches: Sequence[torch.Tensor], shape: Sequence[int], norm: str, bound: float,
                           projection: str, on_step: Callable[[torch.Tensor], None] | None = None,
                           scale: torch.Tensor | None = None) -> torch.Tensor:
    """The inner maximisation: one SGD step (lr 10) per batch on -CE(f(x + delta), f(x).argmax) +
    0.001 ||delta||^2 from delta = 0, projected (bound in pixel units, see `project`) after every step
    or once at the end. `on_step(delta)` sees delta after every step (after its projection)."""
    first = batches[0]
    delta = torch.zeros(tuple(shape), device=first.device, dtype=first.dtype, requires_grad=True)
    for x in batches:
        with torch.no_grad():
            pseudo = model(x).argmax(1)
        loss = -F.cross_entropy(model(x + delta), pseudo) + NORM_PENALTY * delta.pow(2).sum()
        (grad,) = torch.autograd.grad(loss, [delta])  # delta only: the model's weights get no gradient here
        with torch.no_grad():
            delta.sub_(PERTURB_LR * grad)  # plain SGD, as the official torch.optim.SGD(lr=10)
        if projection == "step":
            project(delta, norm, bound, scale)
        if on_step is not None:
            on_step(delta.detach())
    if projection == "end":
        project(delta, norm, bound, scale)
    return delta.detach()


def ibau_algorithm(model: nn.Module, mode: Mode, tuning) -> tuple[nn.Module, list[dict]]:
    """Mode.algorithm of `i-bau`: `settings.epochs` rounds of (universal perturbation, one pass of
    unlearning with the implicit hypergradient), Adam at `settings.lr`."""
    s = tuning.settings
    K, norm, bound = tuning.option("ibau_K"), tuning.option("ibau_norm"), tuning.option("ibau_bound")
    projection, portion = tuning.option("ibau_projection"), tuning.option("ibau_portion")
    images, labels, pipeline = tuning.images, tuning.labels, tuning.pipeline
    device = images.device
    gen = engine.make_generator(s.seed, device, "ibau-batches")
    picker = random.Random(engine.derive_seed(s.seed, "ibau-portion"))
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    # the unlearning batches, augmented once (the official list of batches)
    stored = [(pipeline.train_batch(images[idx], gen), labels[idx])
              for idx in engine.index_batches(len(images), s.batch_size, True, gen, device)]
    shape = (1, *stored[0][0].shape[1:])
    model.eval()

    def inner_loss(delta, _params):
        x, y = stored[0]
        return -F.cross_entropy(model(x + delta[0]), y) + NORM_PENALTY * delta[0].pow(2).sum()

    def fp_map(delta, params_):
        grads = torch.autograd.grad(inner_loss(delta, params_), delta, create_graph=True)
        return [d - FIXED_POINT_LR * g for d, g in zip(delta, grads)]

    rows, norms = [], []
    for epoch in tqdm(range(1, s.epochs + 1), desc=mode.name, unit="round", leave=False, disable=not s.progress,
                      dynamic_ncols=True):
        batches = [pipeline.train_batch(images[idx], gen)
                   for idx in engine.index_batches(len(images), s.batch_size, True, gen, device)]
        delta = universal_perturbation(model, batches, shape, norm, bound, projection, scale=pipeline.std)
        norms.append(pixel_norm(delta, norm, pipeline.std))
        total_loss, correct, seen = 0.0, 0, 0
        for x, y in stored:
            chosen = sorted(picker.sample(range(len(x)), int(len(x) * portion)))
            patch = torch.zeros(len(x), 1, 1, 1, device=device, dtype=x.dtype)
            patch[chosen] = 1.0
            last = {}

            def outer_loss(delta_, _params, x=x, y=y, patch=patch, last=last):
                logits = model(x + patch * delta_[0])
                last["logits"] = logits
                return F.cross_entropy(logits, y)

            grads = fixed_point_hypergradient([delta], params, K, fp_map, outer_loss)
            optimizer.zero_grad(set_to_none=True)
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
            logits = last["logits"].detach()
            total_loss += float(F.cross_entropy(logits, y)) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        if epoch % s.eval_every == 0 or epoch == s.epochs:
            metrics = tuning.evaluate(model)
        else:
            metrics = dict.fromkeys(("clean_acc", "asr", "ra"), float("nan"))
        rows.append({"epoch": epoch, "lr": s.lr, "train_loss": total_loss / seen, "train_acc": correct / seen,
                     **metrics, "delta_norm": norms[-1]})
        model.eval()  # the evaluator may leave it in another mode
    tuning.result["i-bau"] = {"norm": norm, "bound": bound, "projection": projection, "delta_norms": norms}
    return model, rows


register_mode(Mode("i-bau", "i-BAU", False, "all", False, "implicit backdoor adversarial unlearning: a universal adversarial "
                   "perturbation, unlearnt through the implicit hypergradient", algorithm=ibau_algorithm, options=IBAU_OPTIONS,
                   ignores=("momentum", "lr_schedule", "lb_smooth"),
                   defaults=(("split_ratio", 0.05), ("lr", 1e-4), ("batch_size", 256), ("epochs", 5), ("wd", 0.0))))
