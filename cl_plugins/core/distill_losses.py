"""Feature-distillation losses, as plain functions of a student's and a teacher's features.

Every function takes the student's features ``s`` (with gradient) and the teacher's ``t``
(treated as constants: detached here) for the same inputs, row i of both coming from sample i,
and returns a scalar. Which inputs the rows are (the current minibatch, replayed samples, or
both) is the caller's choice (``cl_plugins.core.feature_distill``). The logit loss with a
temperature (``kd_loss``) lives in ``cl_plugins.core.distill``.

- ``hint_loss``: FitNets' hint, 1/2 ||s - t||^2 per sample (Romero et al., ICLR 2015, Eq. 3);
- ``attention_map`` / ``attention_loss``: Zagoruyko & Komodakis (ICLR 2017), the spatial map
  sum_c |A_c|^p, l2-normalised per sample, and the distance between two such maps;
- ``neuron_vectors`` / ``mmd2``: neuron selectivity transfer (Huang & Wang, 2017), the squared
  MMD between the sets of a sample's l2-normalised channel activations under a linear,
  polynomial or Gaussian kernel;
- ``rkd_distance``: relational KD's distance loss (Park et al., CVPR 2019), the Huber distance
  between the normalised pairwise distances (its angle loss: ``core.rkd_angle``);
- ``triplet_cosines``: the cosine of the angle at j of triplets (i, j, k), for chosen triplets;
- ``subspace_distance``: subspace distillation (Roy et al., Neural Networks 2023), per class
  2m - 2 ||P_s^T P_t||_F^2 between the m-dimensional leading left-singular subspaces;
- ``erg_triplet_mask`` / ``erg_angle_loss``: the exemplar relation loss of ERDIL (Dong et al.,
  AAAI 2021): the Huber distance between the angle cosines of the triplets of a set of nodes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from cl_plugins.core.checks import check_choice, check_int, check_non_negative
from cl_plugins.core.subspace_grad import leading_subspace

KERNELS = ("linear", "poly", "gaussian")
HINT_REDUCTIONS = ("half_sum", "mse")
AT_DISTANCES = ("mean_sq", "norm")


def _same_rows(name: str, s: torch.Tensor, t: torch.Tensor) -> None:
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"{name}: the student's and the teacher's features must have one row per "
                         f"sample each; got {s.shape[0]} and {t.shape[0]} rows")


def hint_loss(s: torch.Tensor, t: torch.Tensor, reduction: str = "half_sum") -> torch.Tensor:
    """``"half_sum"``: mean over samples of 1/2 ||s_i - t_i||^2 (FitNets' L_HT, Eq. 3);
    ``"mse"``: the mean over every element (``F.mse_loss``). Shapes must agree."""
    check_choice("reduction", reduction, HINT_REDUCTIONS)
    if s.shape != t.shape:
        raise ValueError(f"hint_loss: the student's features {tuple(s.shape)} and the teacher's "
                         f"{tuple(t.shape)} differ in shape; map them with a regressor first")
    diff = s - t.detach()
    if reduction == "mse":
        return diff.pow(2).mean()
    return 0.5 * diff.pow(2).flatten(1).sum(1).mean()


def _spatial(name: str, f: torch.Tensor) -> torch.Tensor:
    if f.dim() < 3:
        raise ValueError(f"{name} needs spatial feature maps [N, C, H, W] (or [N, C, L]); got a "
                         f"tensor of shape {tuple(f.shape)}")
    return f.flatten(2)  # [N, C, HW]


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Q = sum over channels of |f_c|^p, flattened over space and l2-normalised per sample:
    ``[N, H*W]`` (the mean over channels gives the same map after normalising)."""
    f = _spatial("attention_map", f)
    q = (f.pow(2) if p == 2 else f.abs().pow(p)).sum(1)  # p = 2: the same, without abs (speed)
    return F.normalize(q, p=2, dim=1)


def attention_loss(s: torch.Tensor, t: torch.Tensor, p: float = 2.0,
                   distance: str = "mean_sq") -> torch.Tensor:
    """Distance between the attention maps of ``s`` and ``t`` (same spatial size, any number of
    channels). ``"mean_sq"``: mean over samples and positions of the squared difference;
    ``"norm"``: mean over samples of ||Q_s - Q_t||_2 (the paper's Eq. 2 without beta / 2)."""
    check_choice("distance", distance, AT_DISTANCES)
    _same_rows("attention_loss", s, t)
    qs, qt = attention_map(s, p), attention_map(t.detach(), p)
    if qs.shape != qt.shape:
        raise ValueError(f"attention_loss: the attention maps differ in size: {tuple(s.shape)} "
                         f"vs {tuple(t.shape)} (the spatial sizes must agree)")
    diff = qs - qt
    return diff.pow(2).mean() if distance == "mean_sq" else diff.norm(dim=1).mean()


def neuron_vectors(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Each channel's activations over space, l2-normalised: ``[N, C, H*W]``, f / sqrt(||f||^2 +
    eps), as the official NST code (MXNet ``L2Normalization(mode="spatial", eps=1e-10)``): an
    all-zero channel stays 0 and a nearly-zero one gets a bounded gradient."""
    v = _spatial("neuron_vectors", f)
    return v / (v.pow(2).sum(2, keepdim=True) + eps).sqrt()


def _kernel(a: torch.Tensor, b: torch.Tensor, kernel: str, degree: int, c: float,
            sigma: float) -> torch.Tensor:
    """Batched Gram matrices k(a_i, b_j): a [N, P, D], b [N, Q, D] -> [N, P, Q]."""
    if kernel == "gaussian":
        d2 = (a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1).unsqueeze(1)
              - 2 * a @ b.transpose(1, 2)).clamp_min(0)
        return torch.exp(-d2 / (2 * sigma * sigma))
    dot = a @ b.transpose(1, 2)
    return dot if kernel == "linear" else (dot + c).pow(degree)


def mmd2(s: torch.Tensor, t: torch.Tensor, kernel: str = "poly", degree: int = 2, c: float = 0.0,
         sigma: float = 1.0) -> torch.Tensor:
    """Mean over samples of the (biased) squared MMD between the student's and the teacher's
    sets of neuron vectors (``neuron_vectors``; the channel counts may differ, the spatial sizes
    must agree):

        MMD^2 = mean_{i,i'} k(s_i, s_i') + mean_{j,j'} k(t_j, t_j') - 2 mean_{i,j} k(s_i, t_j)

    ``"linear"``: k = x.y; ``"poly"``: k = (x.y + c)^degree (the paper: degree 2, c 0);
    ``"gaussian"``: k = exp(-||x - y||^2 / (2 sigma^2)). The official code (TuSimple, poly
    kernel only) drops the teacher-only term, a constant: same gradient, value shifted."""
    check_choice("kernel", kernel, KERNELS)
    _same_rows("mmd2", s, t)
    a, b = neuron_vectors(s), neuron_vectors(t.detach())
    if a.shape[2] != b.shape[2]:
        raise ValueError(f"mmd2: the spatial sizes differ: {tuple(s.shape)} vs {tuple(t.shape)}")
    k = lambda u, v: _kernel(u, v, kernel, degree, c, sigma).mean((1, 2))  # noqa: E731
    return (k(a, a) + k(b, b) - 2 * k(a, b)).mean()


def _pairwise_distances(f: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of ``f`` [N, D], 0 on the diagonal, safe to
    differentiate where two rows coincide."""
    sq = f.pow(2).sum(1)
    d2 = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * f @ f.t()).clamp_min(1e-12)
    d = d2.sqrt()
    return d * (1 - torch.eye(f.shape[0], device=f.device, dtype=f.dtype))


def rkd_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Huber (smooth-l1, delta 1) loss between psi_D(s) and psi_D(t), averaged over all N x N
    entries (the diagonal, 0 in both, included, as lenscloth/RKD's ``RkdDistance``), where
    psi_D(f)_ij = ||f_i - f_j|| / mu and mu is the mean distance over pairs i != j. Features are
    flattened per sample; 0 for fewer than 2 samples."""
    _same_rows("rkd_distance", s, t)
    if s.shape[0] < 2:
        return s.sum() * 0
    ds, dt = _pairwise_distances(s.flatten(1)), _pairwise_distances(t.detach().flatten(1))
    n_pairs = s.shape[0] * (s.shape[0] - 1)
    ds = ds / (ds.sum() / n_pairs).clamp_min(1e-12)
    dt = dt / (dt.sum() / n_pairs).clamp_min(1e-12)
    return F.smooth_l1_loss(ds, dt)


def _all_angles(f: torch.Tensor) -> torch.Tensor:
    """cos of the angle at j between (f_i - f_j) and (f_k - f_j), for every (j, i, k):
    ``[N, N, N]``, 0 where i = j or k = j and where f_i coincides with f_j (as lenscloth/RKD's
    normalised zero differences). Computed from the Gram matrix G = f f^T in float64,

        <f_i - f_j, f_k - f_j> = G_ik - G_ij - G_jk + G_jj,  ||f_i - f_j||^2 = G_ii + G_jj - 2 G_ij,

    so it holds O(N^3 + N^2) values whatever the width D (the N^2 unit differences of the
    official code take N^2 D); rows closer than 1e-6 of their norms count as coinciding."""
    f64 = f.to(torch.float64)
    g = f64 @ f64.t()
    sq = g.diagonal()
    d2 = sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * g
    apart = d2 > 1e-12 * (sq.unsqueeze(0) + sq.unsqueeze(1))  # never on the diagonal
    inv = torch.where(apart, torch.where(apart, d2, torch.ones_like(d2)).rsqrt(),
                      torch.zeros_like(d2))  # 1 / ||f_i - f_j||, 0 for coinciding rows
    num = g.unsqueeze(0) - g.unsqueeze(2) - g.unsqueeze(1) + sq.view(-1, 1, 1)  # [j, i, k]
    return (num * inv.unsqueeze(2) * inv.unsqueeze(1)).to(f.dtype)


def triplet_cosines(f: torch.Tensor, triplets: torch.Tensor) -> torch.Tensor:
    """cos of the angle at f_j between (f_i - f_j) and (f_k - f_j) for each row (i, j, k) of
    ``triplets`` [M, 3] (long): ``[M]``."""
    f = f.flatten(1)
    i, j, k = triplets.unbind(1)
    a = F.normalize(f[i] - f[j], p=2, dim=1)
    b = F.normalize(f[k] - f[j], p=2, dim=1)
    return (a * b).sum(1)


def subspace_distance(s: torch.Tensor, t: torch.Tensor, dim: int = 10,
                      labels: Optional[torch.Tensor] = None, noise_std: float = 0.0,
                      generator: Optional[torch.Generator] = None,
                      gap_floor: float = 0.0) -> torch.Tensor:
    """Mean over the classes k in ``labels`` (one class over every row when None) of

        d_k = 2 r - 2 ||P_s,k^T P_t,k||_F^2,

    P_.,k the leading ``dim``-dimensional left-singular subspace of the class's features
    (``[n_k, D]``, flattened per sample) and r = min(dim, n_k, D) its actual dimension, so that
    d_k = 0 for equal subspaces and 2r for orthogonal ones (the chordal distance). Before the
    SVD, N(0, noise_std^2) noise drawn from ``generator`` is added to both (the official code
    adds 0.01: it splits repeated singular values, whose subspaces have unstable gradients).
    The subspaces are one batched SVD per class size, with the gradient taken over the singular
    pairs across the cut only and gaps below ``gap_floor`` counted as ``gap_floor``
    (``core.subspace_grad.leading_subspace``).
    Non-finite features (a diverged model) give a NaN distance, not an SVD error, so that a
    divergence guard reports the run as diverged.
    """
    _same_rows("subspace_distance", s, t)
    check_int("dim", dim, 1)
    check_non_negative("noise_std", noise_std)
    check_non_negative("gap_floor", gap_floor)
    s, t = s.flatten(1), t.detach().flatten(1)
    if not bool(torch.isfinite(s).all() & torch.isfinite(t).all()):
        return (s.sum() + t.sum()) * float("nan")
    if noise_std > 0:
        noise = torch.randn((2,) + tuple(s.shape), generator=generator, dtype=s.dtype,
                            device="cpu" if generator is None else generator.device)
        noise = noise.to(s.device) * noise_std
        s, t = s + noise[0], t + noise[1]
    if labels is None:
        groups = [torch.arange(s.shape[0], device=s.device)]
    else:
        labels = labels.reshape(-1).to(s.device)
        order = torch.argsort(labels, stable=True)
        counts = torch.unique_consecutive(labels[order], return_counts=True)[1]
        groups = list(torch.split(order, counts.tolist()))
    by_size = {}
    for idx in groups:
        by_size.setdefault(idx.shape[0], []).append(idx)
    dists = []
    for idx in by_size.values():  # one batched SVD per class size: students and teachers
        idx = torch.stack(idx)  # [G, n_k]
        u = leading_subspace(torch.cat([s[idx], t[idx]]), dim, gap_floor)  # [2G, D, r]
        us, ut = u[:idx.shape[0]], u[idx.shape[0]:]
        dists.append(2 * u.shape[2] - 2 * (us.transpose(1, 2) @ ut).pow(2).sum((1, 2)))
    return torch.cat(dists).mean()


def erg_triplet_mask(labels: torch.Tensor, cross_class: bool = False) -> torch.Tensor:
    """The triplets of an exemplar relation graph over the N nodes labelled ``labels``, as a
    boolean ``[N, N, N]`` mask indexed (j, i, k) like ``_all_angles``: the angle at vertex j
    between the edges to i and to k, for i, j, k distinct and i < k (the angle (k, j, i) is the
    same one, counted once). ``cross_class``: only triplets whose three labels differ."""
    y = labels.reshape(-1)
    n = y.shape[0]
    ar = torch.arange(n, device=y.device)
    j, i, k = torch.meshgrid(ar, ar, ar, indexing="ij")
    mask = (i < k) & (i != j) & (k != j)
    if cross_class:
        mask &= (y[i] != y[j]) & (y[k] != y[j]) & (y[i] != y[k])
    return mask


def erg_angle_loss(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the triplets (j, i, k) selected by ``mask`` (``erg_triplet_mask``) of the
    Huber loss (smooth-l1, delta 1) between cos angle_j(s_i, s_j, s_k) and the same cosine of
    the teacher's features ``t`` (rows: the graph's nodes, flattened per sample); 0 when the mask
    selects no triplet. O(N^3) memory (one cosine per ordered triplet of each model)."""
    _same_rows("erg_angle_loss", s, t)
    n = s.shape[0]
    if tuple(mask.shape) != (n, n, n):
        raise ValueError(f"erg_angle_loss: the triplet mask must be [{n}, {n}, {n}] for {n} "
                         f"nodes; got {tuple(mask.shape)}")
    if not bool(mask.any()):
        return s.sum() * 0
    mask = mask.to(s.device)
    cs, ct = _all_angles(s.flatten(1)), _all_angles(t.detach().flatten(1))
    return F.smooth_l1_loss(cs[mask], ct[mask])
