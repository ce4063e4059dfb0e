"""Exact t-SNE (van der Maaten & Hinton, 2008) in plain torch, for feature pictures of a few thousand points.

The steps: standardise the features, reduce them to `pca_dims` principal components, find for every
point the Gaussian bandwidth whose conditional distribution has the requested perplexity, symmetrise
the affinities into P, and move a low-dimensional embedding by gradient descent on KL(P || Q), Q
being the Student-t (one degree of freedom) affinities of the embedding. Optimisation details follow
the paper and common practice: early exaggeration of P (x12 for the first 250 iterations), momentum
0.5 then 0.8, per-coordinate adaptive gains (Jacobs, 1988), a learning rate of max(N / 12 / 4, 50),
and a PCA initialisation scaled to standard deviation 1e-4 (deterministic; a seeded jitter, 1% of
that scale, only separates duplicate points). Cost is O(N^2) memory and time per iteration: fine
for N up to ~3000 on a CPU.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from utils import engine
from utils.errors import UserError

EXAGGERATION = 12.0
EXAGGERATION_ITERS = 250
BLOCK = 256  # rows per block of the N x N computations


def _pca(x: torch.Tensor, k: int) -> torch.Tensor:
    """The first k principal-component scores of the (centred) rows of x, signs fixed so that each
    component's largest loading is positive (the SVD's signs are otherwise arbitrary)."""
    x = x - x.mean(0, keepdim=True)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(k, s.numel())
    vh = vh[:k]
    sign = torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True))).squeeze(1)
    sign[sign == 0] = 1
    return u[:, :k] * (s[:k] * sign)


def _sq_distances(x: torch.Tensor) -> torch.Tensor:
    sq = (x * x).sum(1)
    return (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min_(0.0)


def conditional_affinities(d2: torch.Tensor, perplexity: float, tol: float = 1e-5, max_iter: int = 100,
                           block: int = BLOCK) -> torch.Tensor:
    """Row-stochastic P_{j|i} = exp(-beta_i d_ij) / sum_k exp(-beta_i d_ik) (no self-affinity), each
    beta_i found by bisection so that row i's entropy is log(perplexity). Rows are searched a block
    at a time, so that the working set stays in the cache."""
    n = d2.shape[0]
    target = math.log(perplexity)
    out = torch.empty_like(d2)
    for start in range(0, n, block):
        rows = torch.arange(start, min(start + block, n), device=d2.device)
        self_mask = torch.zeros(len(rows), n, dtype=torch.bool, device=d2.device)
        self_mask[torch.arange(len(rows)), rows] = True
        d = d2[rows].masked_fill(self_mask, float("inf"))
        # shift each row so its nearest neighbour is at 0: exp() can then never underflow to all zeros
        d = (d - d.min(1, keepdim=True).values).masked_fill_(self_mask, 0.0)
        keep = (~self_mask).to(d.dtype)
        beta = (n - 1) / d.sum(1).clamp_min(1e-12)  # start at 1 / (mean distance)
        lo = torch.zeros_like(beta)
        hi = torch.full_like(beta, float("inf"))
        for _ in range(max_iter):
            p = torch.exp(-d * beta[:, None]).mul_(keep)
            sum_p = p.sum(1)
            entropy = torch.log(sum_p) + beta * (d * p).sum(1) / sum_p
            diff = entropy - target
            if float(diff.abs().max()) < tol:
                break
            too_flat = diff > 0  # entropy too high: the Gaussian is too wide, beta must grow
            lo = torch.where(too_flat, beta, lo)
            hi = torch.where(too_flat, hi, beta)
            beta = torch.where(torch.isinf(hi), beta * 2.0, (lo + hi) / 2.0)
        p = torch.exp(-d * beta[:, None]).mul_(keep)
        out[rows] = p / p.sum(1, keepdim=True)
    return out


def _gradient(y: torch.Tensor, p: torch.Tensor, exaggeration: float, block: int = BLOCK) -> torch.Tensor:
    """dKL/dy = 4 sum_j (e p_ij - q_ij) w_ij (y_i - y_j), w_ij = (1 + |y_i - y_j|^2)^-1 and q = w / sum(w).
    Written as 4 (e A - B / S) with A = sum_j p_ij w_ij (y_i - y_j), B = sum_j w_ij^2 (y_i - y_j) and
    S = sum w, all three accumulated over blocks of rows, so that each N x N pass stays in the cache
    (three times faster on a CPU than whole-matrix operations)."""
    n = y.shape[0]
    sq = (y * y).sum(1)
    sq_row = (sq + 1.0)[None, :]
    y_t = -2.0 * y.T
    a, b = torch.empty_like(y), torch.empty_like(y)
    total = y.new_zeros(())
    for start in range(0, n, block):
        stop = min(start + block, n)
        yb = y[start:stop]
        w = torch.addmm(sq_row, yb, y_t).add_(sq[start:stop, None]).reciprocal_()  # 1 / (1 + |y_i - y_j|^2)
        w[torch.arange(stop - start), torch.arange(start, stop)] = 0.0
        total += w.sum()
        pw = p[start:stop] * w
        ww = w.mul_(w)
        a[start:stop] = pw.sum(1, keepdim=True) * yb - pw @ y
        b[start:stop] = ww.sum(1, keepdim=True) * yb - ww @ y
    return 4.0 * (exaggeration * a - b / total)


def tsne(x: torch.Tensor, dim: int = 2, perplexity: float = 30.0, iterations: int = 750, seed: int = 0,
         pca_dims: int = 50, progress: bool = False) -> torch.Tensor:
    """Embed the rows of `x` (N, D) in `dim` dimensions; returns a float32 (N, dim) tensor on x's
    device. Deterministic for a given seed and device. A perplexity too large for N is lowered to
    (N - 1) / 3, so that small sets (a test, a quick look) still work."""
    if x.ndim != 2:
        raise UserError(f"t-SNE expects an (N, D) matrix, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n < 4:
        raise UserError(f"t-SNE needs at least 4 points, got {n}")
    if perplexity <= 0 or iterations < 1 or dim < 1:
        raise UserError("t-SNE needs perplexity > 0, iterations >= 1 and dim >= 1")
    perplexity = min(float(perplexity), (n - 1) / 3.0)
    device = x.device
    block = BLOCK if device.type == "cpu" else n  # blocks help the CPU's cache; a GPU wants whole-matrix kernels
    # float64 for the preprocessing and the bandwidth search (the entropies need it), float32 after
    x = x.detach().to(torch.float64)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12)
    reduced = _pca(x, pca_dims) if x.shape[1] > pca_dims else x - x.mean(0)
    cond = conditional_affinities(_sq_distances(reduced), perplexity, block=block)
    p = ((cond + cond.T) / (2.0 * n)).clamp_min_(1e-12).to(torch.float32)
    del cond

    gen = engine.make_generator(seed, device, "tsne-init")
    init = _pca(x, dim).to(torch.float32)
    if init.shape[1] < dim:  # fewer informative directions than output dimensions: random ones for the rest
        extra = torch.randn(n, dim - init.shape[1], generator=gen, device=device)
        init = torch.cat([init, extra], 1)
    init = init / init[:, 0].std().clamp_min(1e-12) * 1e-4
    y = init + 1e-6 * torch.randn(n, dim, generator=gen, device=device)

    lr = max(n / EXAGGERATION / 4.0, 50.0)
    update = torch.zeros_like(y)
    gains = torch.ones_like(y)
    for it in tqdm(range(iterations), desc="t-SNE", leave=False, disable=not progress):
        early = it < EXAGGERATION_ITERS
        grad = _gradient(y, p, EXAGGERATION if early else 1.0, block)
        gains = torch.where((grad > 0) != (update > 0), gains + 0.2, gains * 0.8).clamp_min_(0.01)
        update = (0.5 if early else 0.8) * update - lr * gains * grad
        y = y + update
        y = y - y.mean(0, keepdim=True)
    return y


def knn_separation(emb: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Leave-one-out accuracy of a k-nearest-neighbour majority vote predicting `labels` from the
    embedding (ties go to the lower label). With labels poisoned/clean it says how much the poisoned
    points form their own cluster: about the majority share when mixed in, 1.0 when fully apart."""
    emb = emb.detach().to(torch.float64)
    labels = labels.to(emb.device).long()
    n = emb.shape[0]
    k = min(k, n - 1)
    if k < 1:
        raise UserError("the k-NN score needs at least 2 points")
    d = _sq_distances(emb)
    d.fill_diagonal_(float("inf"))
    nearest = d.topk(k, dim=1, largest=False).indices
    votes = torch.nn.functional.one_hot(labels[nearest], int(labels.max()) + 1).sum(1)
    return float((votes.argmax(1) == labels).double().mean())


def knn_vote(ref: torch.Tensor, ref_labels: torch.Tensor, query: torch.Tensor, k: int = 5) -> torch.Tensor:
    """The majority label (ties to the lower label) among the k nearest rows of `ref` for each row of `query`."""
    ref, query = ref.detach().to(torch.float64), query.detach().to(ref.device, torch.float64)
    k = min(k, ref.shape[0])
    d = ((query * query).sum(1)[:, None] + (ref * ref).sum(1)[None, :] - 2.0 * query @ ref.T).clamp_min_(0.0)
    nearest = d.topk(k, dim=1, largest=False).indices
    labels = ref_labels.to(ref.device).long()
    return torch.nn.functional.one_hot(labels[nearest], int(labels.max()) + 1).sum(1).argmax(1)
