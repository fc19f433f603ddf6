"""The leading right-singular subspace of a batch of matrices, with a gradient that is finite
wherever the subspace itself is well defined.

``leading_subspace(f, m)`` returns ``W_r`` ([B, D, r], r = min(m, n, D)), the leading r right
singular vectors of each ``f_b`` ([n, D], one sample per row), i.e. the leading eigenvectors of
``f_b^T f_b``. Its backward assumes what every subspace loss satisfies: the loss depends on
``W_r`` only through the projector ``W_r W_r^T`` (it is unchanged by ``W_r -> W_r Q`` for an
orthogonal Q). Then only the rotations of the subspace *across the cut* carry gradient. With the
thin SVD ``f = U diag(s) W^T`` (k = min(n, D) columns), lambda = s^2 and ``G = dL/dW_r``:

    c_ij = g_i . w_j,  K_ij = c_ij / (lambda_i - lambda_j)          (i <= r < j <= k)
    dL/df = U_r diag(s_r) K W_o^T + U_o diag(s_o) K^T W_r^T          (the other singular pairs)
          + U_r diag(1 / s_r) ((I - W W^T) G)^T                       (the null space of f, n < D)

``torch.linalg.svd``'s own backward also has the pairs *inside* the leading block; their terms
cancel in exact arithmetic for such a loss, but grow as
1 / (lambda_i - lambda_j) for close singular values inside the block and do not cancel in
floating point: the cause of the NaN and collapsed runs of DER + SD in D1. This backward is the
same gradient without them (tested against torch's on well-separated spectra and against finite
differences on a degenerate leading block). It is still large when lambda_r ~ lambda_{r+1}, where
the subspace itself is ill defined; a pair whose gap is within the SVD's rounding
(``|lambda_i - lambda_j| <= 8 eps lambda_1``: equal to working precision) contributes nothing,
where the formula would give inf or NaN (D1 DER + SD, seed 1: float32 singular values equal
across the cut after 9,571 steps). The gaps are formed as (s_i - s_j)(s_i + s_j).

``gap_floor`` (default 0: the exact gradient above) bounds that growth: a singular-value gap
``s_i - s_j`` across the cut smaller than ``gap_floor`` counts as ``gap_floor``, so each
rotation term is at most ``|c_ij| / (2 gap_floor)`` times the features' scale. Singular values
closer than the features' own noise (subspace distillation adds N(0, 0.01^2) to them before the
SVD) do not say which of the two directions leads, yet the exact gradient turns them by
``1 / gap``: D1's DER + SD seed 3 went from a parameter maximum of 1.3 to 1,106 in four SGD
steps of experience 5, each started by a relative eigenvalue gap of 1e-6 to 3e-6 across the cut
(docs/methods/subspace_kd.md). The floored gradient is the exact one wherever every gap across
the cut is at least ``gap_floor``; with a floor, a tie across the cut gets the floored term
instead of none.
"""

from __future__ import annotations

import torch

TIE_EPS = 8  # gaps |lambda_i - lambda_j| <= TIE_EPS * eps * lambda_1 count as ties


class _LeadingSubspace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f: torch.Tensor, m: int, gap_floor: float) -> torch.Tensor:
        w, s, vh = torch.linalg.svd(f.transpose(-2, -1), full_matrices=False)  # f^T = w s vh
        r = min(m, w.shape[-1])
        ctx.save_for_backward(w, s, vh)
        ctx.r, ctx.gap_floor = r, gap_floor
        return w[..., :r]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        w, s, vh = ctx.saved_tensors
        r = ctx.r
        u = vh.transpose(-2, -1)  # f's left singular vectors, [B, n, k]
        lam = s * s
        w_r, w_o = w[..., :r], w[..., r:]
        ds = s[..., :r, None] - s[..., None, r:]  # >= 0: s is sorted, descending
        if ctx.gap_floor > 0:
            ds = ds.clamp(min=ctx.gap_floor)
        gap = ds * (s[..., :r, None] + s[..., None, r:])
        # a gap within the SVD's own rounding (equal singular values to working precision,
        # where the subspace is not defined) contributes nothing instead of inf / NaN
        tie = gap.abs() <= TIE_EPS * torch.finfo(s.dtype).eps * lam[..., :1, None]
        k_ = (g.transpose(-2, -1) @ w_o) / torch.where(tie, torch.ones_like(gap), gap)
        k_ = k_.masked_fill(tie, 0.0)
        grad = (u[..., :r] * s[..., None, :r]) @ k_ @ w_o.transpose(-2, -1)
        grad = grad + (u[..., r:] * s[..., None, r:]) @ k_.transpose(-2, -1) @ \
            w_r.transpose(-2, -1)
        resid = g - w @ (w.transpose(-2, -1) @ g)  # the part of G in f's null space
        grad = grad + (u[..., :r] / s[..., None, :r]) @ resid.transpose(-2, -1)
        return grad, None, None


def leading_subspace(f: torch.Tensor, m: int, gap_floor: float = 0.0) -> torch.Tensor:
    """Orthonormal bases [B, D, r] (r = min(m, n, D)) of the leading right-singular subspaces of
    ``f`` [B, n, D]; the gradient is for losses of the subspace only, with singular-value gaps
    across the cut below ``gap_floor`` counted as ``gap_floor`` (module docstring)."""
    return _LeadingSubspace.apply(f, int(m), float(gap_floor))
