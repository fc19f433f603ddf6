"""Stored output-gradient directions of ``nn.Linear`` layers, kept as per-layer factors.

For a Linear layer ``h = W a + b`` the gradient of one output of one sample is ``d a^T`` for the
weight and ``d`` for the bias (``a`` the layer's input, ``d`` the output's gradient with respect
to ``h``). When every protected parameter is the weight or bias of a Linear layer, called once per
forward on ``[n, in]`` inputs, a direction ``v_j`` of the whole parameter vector is therefore given
by one ``(a, d)`` pair per layer: ``in + out`` numbers per layer instead of ``in * out``.

:class:`FactoredDirections` keeps the raw vectors ``V = [v_1 .. v_m]`` that passed the drop rule,
as factors (``A_l [m, in]``, ``D_l [m, out]``, the parameters' dtype), and the float64 Cholesky
factor ``R`` of their Gram matrix ``K = V^T V = R^T R``:

    K_ij = sum_l (a_i . a_j + [bias_l]) (d_i . d_j)       (computed from the stored factors)
    S = V R^-1 is orthonormal and spans V; S S^T = V K^-1 V^T.

- **Adding** vectors (``add``): their coefficients on S are ``R^-T B`` (``B = V^T V_new``) and
  their Gram-Schmidt residuals have the Gram matrix ``K_new - B^T R^-1 R^-T B``; a vector is kept
  when its residual norm exceeds ``tol`` times its own norm, in order (Gram-Schmidt by a Cholesky
  factorisation with rejected pivots). Same rule as the dense float64 Gram-Schmidt; the Gram
  route loses accuracy only as cond(V)^2 eps_64, far below ``tol`` for any kept set.
- **The step** (``step_``): ``t = V^T g`` (per layer ``rowsum((D_l G_l) * A_l) + D_l g_b``),
  ``c = K^-1 t`` (float64), ``G_l <- G_l - (D_l^T diag(c)) A_l`` and ``g_b <- g_b - D_l^T c``:
  ``2 m n_params`` multiply-adds in matrix-matrix products (compute-bound), where the dense form's
  two matrix-vector products read ``m n_params`` stored numbers twice (memory-bound). Rounding in
  ``t`` is amplified by cond(V) (about 60 on P1 after 5 tasks; ``condition`` reports it).

Not used (the caller falls back to dense directions) when a protected parameter is not a Linear
weight or bias, a Linear is called more than once per forward, or its input is not 2-D
(:class:`NotFactorable`).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .layer_inputs import call_model


class NotFactorable(ValueError):
    """The model's output gradients are not one (input, output-gradient) pair per layer."""


def linear_blocks(model: nn.Module, params: Dict[str, torch.Tensor]
                  ) -> Optional[List[Tuple[nn.Linear, str, Optional[str]]]]:
    """``(layer, weight name, bias name or None)`` per Linear layer whose weight is in ``params``,
    in ``params``' order; None unless these cover ``params`` exactly."""
    owner = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            owner[f"{name}.weight" if name else "weight"] = (mod, "weight")
            if mod.bias is not None:
                owner[f"{name}.bias" if name else "bias"] = (mod, "bias")
    blocks, covered = [], set()
    for pname in params:
        if pname not in owner:
            return None
        mod, kind = owner[pname]
        if kind == "weight":
            prefix = pname[:-len("weight")]
            bias = prefix + "bias" if mod.bias is not None and prefix + "bias" in params else None
            blocks.append((mod, pname, bias))
            covered.update({pname, bias} - {None})
    return blocks if covered == set(params) else None


def output_factors(model: nn.Module, blocks, x: torch.Tensor, y: torch.Tensor, variant: str,
                   task: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``(A_l [k, in], D_l [k, out])`` per block for the variant's output gradients of a batch
    (same rows and order as the dense ones: ``"gtl"`` f_y, ``"ave"`` the mean logit, ``"all"``
    every logit, sample-major). The model must be in eval mode (samples independent)."""
    inputs, outputs, handles = {}, {}, []

    def hook(i):
        def fn(mod, args, out):
            if i in inputs or args[0].dim() != 2:
                raise NotFactorable(f"{type(mod).__name__} #{i} is called more than once per "
                                    "forward or on an input that is not [n, in]")
            inputs[i], outputs[i] = args[0].detach(), out
        return fn

    for i, (mod, _, _) in enumerate(blocks):
        handles.append(mod.register_forward_hook(hook(i)))
    try:
        with torch.enable_grad():
            logits = call_model(model, x, int(task))
            if len(inputs) != len(blocks) or not all(o.requires_grad for o in outputs.values()):
                raise NotFactorable("a protected Linear layer is not on the path to the output")
            outs = [outputs[i] for i in range(len(blocks))]
            if variant == "gtl":
                objectives = [logits.gather(1, y.long().view(-1, 1)).sum()]
            elif variant == "ave":
                objectives = [logits.mean(1).sum()]
            else:
                objectives = [logits[:, j].sum() for j in range(logits.shape[1])]
            per_obj = [[torch.zeros_like(out) if g is None else g for g, out in zip(
                torch.autograd.grad(o, outs, retain_graph=True, allow_unused=True), outs)]
                for o in objectives]  # a layer off the output's path: a zero part
    finally:
        for h in handles:
            h.remove()
    c = len(objectives)
    result = []
    for i in range(len(blocks)):
        d = torch.stack([g[i] for g in per_obj], dim=1).reshape(len(x) * c, -1)
        result.append((inputs[i].repeat_interleave(c, dim=0), d.detach()))
    return result


def drop_cholesky(schur: torch.Tensor, norms2: torch.Tensor, tol: float, block: int = 64):
    """Cholesky factorisation of the Gram matrix ``schur`` of residuals, in order, skipping
    column i when its residual against the kept ones is at most ``tol`` times its own norm
    (``norms2[i]`` its squared norm). Returns (kept indices, L) with ``L[:j, :j]`` the kept
    columns' lower factor. Blocked: the columns of a block are first reduced against every
    column kept before the block in one triangular solve, then decided one by one."""
    k = schur.shape[0]
    keep: List[int] = []
    L = torch.zeros_like(schur)
    for b0 in range(0, k, block):
        cols = list(range(b0, min(b0 + block, k)))
        j0 = len(keep)
        sub = schur[cols][:, cols]
        if j0:
            before = torch.linalg.solve_triangular(L[:j0, :j0], schur[keep][:, cols], upper=False)
            sub = sub - before.T @ before
        for q, i in enumerate(cols):
            j = len(keep)
            inside = [c for c in range(q) if cols[c] in keep[j0:]]  # kept in this block
            r_in = torch.linalg.solve_triangular(L[j0:j, j0:j], sub[inside, q:q + 1],
                                                 upper=False)[:, 0] if inside else sub.new_zeros(0)
            rho = float(sub[q, q] - r_in @ r_in)
            if rho > 0 and rho > tol ** 2 * float(norms2[i]) and norms2[i] > 0:
                if j0:
                    L[j, :j0] = before[:, q]
                L[j, j0:j] = r_in
                L[j, j] = rho ** 0.5
                keep.append(i)
    return keep, L


def block_inner(a: torch.Tensor, d: torch.Tensor, gw: torch.Tensor,
                gb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One block's part of V^T g: ``rowsum((D G_w) * A) + D g_b`` (``gb`` None: no bias)."""
    t = ((d @ gw) * a).sum(1)
    return t if gb is None else t + d @ gb


class FactoredDirections:
    """The orthonormal span of stored directions, held as per-layer factors (module docstring).
    ``blocks``: ``[(in, out, has_bias)]`` in the flat parameter order."""

    def __init__(self, blocks: List[Tuple[int, int, bool]]):
        self.blocks = [(int(i), int(o), bool(b)) for i, o, b in blocks]
        self.A: List[torch.Tensor] = []
        self.D: List[torch.Tensor] = []
        self.R: Optional[torch.Tensor] = None  # float64 [m, m], upper triangular, K = R^T R
        self.Kinv: Optional[torch.Tensor] = None  # float64 [m, m]

    @property
    def m(self) -> int:
        return 0 if self.R is None else int(self.R.shape[0])

    @property
    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.A + self.D) + \
            (0 if self.R is None else 2 * self.R.numel() * 8)

    def _gram(self, A1, D1, A2, D2) -> torch.Tensor:
        K = 0
        for (_, _, bias), a1, d1, a2, d2 in zip(self.blocks, A1, D1, A2, D2):
            aa = a1.double() @ a2.double().T
            K = K + (aa + 1.0 if bias else aa) * (d1.double() @ d2.double().T)
        return K

    def add(self, factors: List[Tuple[torch.Tensor, torch.Tensor]], tol: float,
            dtype: torch.dtype, check=None) -> int:
        """Keep, in order, the new vectors whose Gram-Schmidt residual exceeds ``tol`` times their
        norm; returns how many were kept. ``check(m_new, k)``, if given, runs before anything is
        changed (it may raise)."""
        A_new = [a.to(dtype) for a, _ in factors]  # rounded as stored, then the Gram in float64
        D_new = [d.to(dtype) for _, d in factors]
        K_new = self._gram(A_new, D_new, A_new, D_new)
        schur = K_new.clone()
        coef = None
        if self.m:
            B = self._gram(self.A, self.D, A_new, D_new)  # [m, k]
            coef = torch.linalg.solve_triangular(self.R.T, B, upper=False)  # S^T V_new
            schur -= coef.T @ coef
        keep, L = drop_cholesky(schur, K_new.diagonal(), tol)
        if check is not None:
            check(self.m + len(keep), len(keep))
        if not keep:
            return 0
        idx = torch.tensor(keep)
        top = L[:len(keep), :len(keep)].T  # upper triangular block of the new rows
        if self.m:
            m, k = self.m, len(keep)
            R = self.R.new_zeros(m + k, m + k)
            R[:m, :m], R[:m, m:], R[m:, m:] = self.R, coef[:, idx], top
        else:
            R = top
        self.R = R.contiguous()
        self.A = [torch.cat([a, an[idx]]) if self.A else an[idx].contiguous()
                  for a, an in zip(self.A or A_new, A_new)]
        self.D = [torch.cat([d, dn[idx]]) if self.D else dn[idx].contiguous()
                  for d, dn in zip(self.D or D_new, D_new)]
        self.Kinv = torch.cholesky_inverse(self.R, upper=True)
        return len(keep)

    def condition(self) -> float:
        """cond(V) of the kept vectors, columns scaled to unit norm (float64)."""
        if not self.m:
            return 1.0
        K = self.R.T @ self.R
        s = K.diagonal().rsqrt()
        ev = torch.linalg.eigvalsh(K * s[:, None] * s[None, :])
        return float((ev[-1] / ev[0].clamp_min(1e-300)) ** 0.5)

    def to(self, device, dtype) -> "FactoredDirections":
        self.A = [a.to(device=device, dtype=dtype) for a in self.A]
        self.D = [d.to(device=device, dtype=dtype) for d in self.D]
        if self.R is not None:
            self.R, self.Kinv = self.R.to(device), self.Kinv.to(device)
        return self

    def inner(self, grads: List[Tuple[torch.Tensor, Optional[torch.Tensor]]]) -> torch.Tensor:
        """t = V^T g [m] for ``(weight grad, bias grad or None)`` per block."""
        t = 0
        for (_, _, bias), a, d, (gw, gb) in zip(self.blocks, self.A, self.D, grads):
            t = t + block_inner(a, d, gw, gb if bias else None)
        return t

    @torch.no_grad()
    def project_(self, grads: List[Tuple[torch.Tensor, Optional[torch.Tensor]]],
                 t: Optional[torch.Tensor] = None) -> None:
        """``(weight grad [out, in], bias grad [out] or None)`` per block, projected in place;
        ``t`` = V^T g when the caller has it (``core.direction_store``: from the step's inputs)."""
        if not self.m:
            return
        if t is None:
            t = self.inner(grads)
        c = (self.Kinv @ t.double()).to(self.A[0].dtype)
        for (_, _, bias), a, d, (gw, gb) in zip(self.blocks, self.A, self.D, grads):
            dc = d * c[:, None]
            gw.addmm_(dc.T, a, alpha=-1)
            if bias:
                gb.sub_(dc.sum(0))

    def flat_split(self, g: torch.Tensor) -> List[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Views of a flat vector in the blocks' layout (weight then bias per block)."""
        out, r = [], 0
        for n_in, n_out, bias in self.blocks:
            w = g[r:r + n_in * n_out].view(n_out, n_in)
            r += n_in * n_out
            b = g[r:r + n_out] if bias else None
            r += n_out if bias else 0
            out.append((w, b))
        return out

    def dense(self) -> Optional[torch.Tensor]:
        """S = V R^-1, [n_params, m] float64 (for inspection and tests)."""
        if not self.m:
            return None
        rows = []
        for (_, _, bias), a, d in zip(self.blocks, self.A, self.D):
            rows.append((d.double()[:, :, None] * a.double()[:, None, :]).reshape(self.m, -1))
            if bias:
                rows.append(d.double())
        V = torch.cat(rows, dim=1).T
        return torch.linalg.solve_triangular(self.R, V, upper=True, left=False)

    def state_dict(self) -> dict:
        return {"blocks": [list(b) for b in self.blocks], "R": None if self.R is None else
                self.R.cpu(), "A": [a.cpu() for a in self.A], "D": [d.cpu() for d in self.D]}

    @classmethod
    def from_state(cls, state: dict) -> "FactoredDirections":
        out = cls([tuple(b) for b in state["blocks"]])
        out.A, out.D = list(state["A"]), list(state["D"])
        out.R = state["R"]
        out.Kinv = None if out.R is None else torch.cholesky_inverse(out.R, upper=True)
        return out
