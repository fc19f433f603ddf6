"""RKD's angle loss over every triplet of a minibatch, with a hand-written backward pass.

Relational KD's angle term (Park et al., CVPR 2019, RKD-A) compares, between a student's and a
teacher's embeddings f [N, D] of the same N samples, the cosine of the angle at j between
f_i - f_j and f_k - f_j for all N^3 ordered triplets (j, i, k):

    C[j, i, k] = <f_i - f_j, f_k - f_j> u_ji u_jk,     u_ji = 1 / ||f_i - f_j||  (0 if i = j),
    loss = mean over the N^3 entries of huber(C_s - C_t),   huber(x) = x^2 / 2 if |x| <= 1,
                                                                        |x| - 1/2 otherwise.

The official code (lenscloth/RKD, ``RKdAngle``) builds the N^2 unit differences ([N, N, D]) and
multiplies them ([N, N, N] x D multiply-adds). Here the numerator comes from the Gram matrix G of
the centred rows (the angles do not change under a shift): with q_ji = G_ij - G_jj / 2 and
r_ji = u_ji q_ji,

    C[j] = (u_j u_j^T) * G  -  (r_j u_j^T + u_j r_j^T)      (one [N, N] slice per j),

so the work is O(N^2 D) for G, u and r (in float64) and a handful of elementwise passes over
N^3 numbers (in the features' dtype). Autograd through that formula would keep a dozen N^3
temporaries; ``_AngleHuber`` keeps one (the clamped difference W = clamp(C_s - C_t, -1, 1)) and
returns the gradients of (G, u, r) of the student directly:

    dL/dG_ik = sum_j W[j,i,k] u_ji u_jk,
    dL/du_ji = sum_k S[j,i,k] (G_ik u_jk - r_jk),   dL/dr_ji = -sum_k S[j,i,k] u_jk,

with S[j] = W[j] + W[j]^T (u_ji enters C[j] through both the i and the k slot), all divided by
N^3. W is symmetric in (i, k) up to rounding, so S = 2 W: four elementwise passes over N^3 numbers
and their sums; autograd carries these back to f through the O(N^2 D) part.

Conventions kept from the autograd reference (``rkd_angle`` in tests/helpers.py, in
``core.distill_losses`` until 2026-12-06) and from the official code's normalised zero vectors:
entries with i = j or k = j are 0 and count in the mean; rows that
coincide (squared distance at most 1e-12 of their squared norms, in float64) have u = 0, so their
cosines are 0. Precision: the N^3 part runs in the features' dtype; in float32 a cosine's error
is about eps_32 * max|G| u_ji u_jk, which the centring keeps near eps_32 unless two rows are far
closer to each other than to the batch's spread (float64 features: about 1e-15).
"""

from __future__ import annotations

from typing import Tuple

import torch


def angle_factors(f: torch.Tensor, dtype: torch.dtype
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G, u, r) of the module docstring for rows f [N, D], computed in float64 (differentiable)
    and returned in ``dtype``. G, the Gram matrix of the centred rows, is the raw Gram matrix
    doubly centred, and symmetrised."""
    f64 = f.flatten(1).to(torch.float64)
    raw = f64 @ f64.t()
    sq = raw.diagonal()
    d2 = sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * raw
    apart = d2 > 1e-12 * (sq.unsqueeze(0) + sq.unsqueeze(1))  # never on the diagonal
    u = torch.where(apart, torch.where(apart, d2, torch.ones_like(d2)).rsqrt(),
                    torch.zeros_like(d2))
    rows = raw.mean(1, keepdim=True)  # <f_i, mean>
    g = raw - rows - rows.t() + raw.mean()
    g = (g + g.t()) / 2
    q = g - g.diagonal().unsqueeze(1) / 2  # q[j, i] = G_ji - G_jj / 2 (G symmetric)
    return g.to(dtype), u.to(dtype), (u * q).to(dtype)


def all_cosines(g: torch.Tensor, u: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """C [N, N, N] (indexed [j, i, k]) from (G, u, r): three passes over N^3 numbers. C[j] is
    symmetric up to rounding (the rank-2 part is summed in the BLAS' order)."""
    c = u.unsqueeze(2) * u.unsqueeze(1)
    c.mul_(g.unsqueeze(0))
    return c.baddbmm_(torch.stack((r, u), 2), torch.stack((u, r), 1), alpha=-1)


class _AngleHuber(torch.autograd.Function):
    """mean huber(C(G, u, r) - C_t) over N^3 entries; gradients for (G, u, r) only."""

    @staticmethod
    def forward(ctx, g, u, r, teacher):
        diff = all_cosines(g, u, r).sub_(teacher)
        w = diff.clamp(-1.0, 1.0)
        n3 = diff.numel()
        loss = (torch.dot(w.flatten(), diff.flatten()) - 0.5 * torch.dot(w.flatten(), w.flatten())
                ) / n3  # huber(x) = w x - w^2 / 2 with w = clamp(x, -1, 1)
        ctx.save_for_backward(g, u, r, w)
        return loss

    @staticmethod
    def backward(ctx, grad):
        g, u, r, w = ctx.saved_tensors
        scale = grad / w.numel()
        # W is symmetric in (i, k) up to rounding (both C are), so S = W + W^T is taken as 2 W;
        # the sums over k are elementwise products reduced along the last axis (faster here
        # than batched matrix-vector products).
        wu = w * u.unsqueeze(1)  # W[j,i,k] u_jk
        sum_u = wu.sum(2)
        grad_g = (wu * u.unsqueeze(2)).sum(0)  # sum_j W[j,i,k] u_ji u_jk
        wu.mul_(g.unsqueeze(0))
        sum_gu = wu.sum(2)  # sum_k W[j,i,k] G_ik u_jk
        del wu
        sum_r = (w * r.unsqueeze(1)).sum(2)
        return (grad_g * scale, 2 * (sum_gu - sum_r) * scale, -2 * sum_u * scale, None)


def rkd_angle_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """RKD-A: the mean Huber distance between the student's (``s``) and the teacher's (``t``,
    detached) cosines of every triplet angle of the N rows (features flattened per sample), in
    ``s``' dtype; 0 (with a graph) for fewer than 3 rows."""
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"rkd_angle_loss: the student and the teacher need one row per sample; "
                         f"got {s.shape[0]} and {t.shape[0]} rows")
    if s.shape[0] < 3:
        return s.sum() * 0
    with torch.no_grad():
        teacher = all_cosines(*angle_factors(t.detach(), s.dtype))
    return _AngleHuber.apply(*angle_factors(s, s.dtype), teacher)
