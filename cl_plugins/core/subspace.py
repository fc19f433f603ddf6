"""Fan-in subspaces: eigendecompositions in float64 and projectors applied to weight updates.

A projector here acts on the fan-in side of a layer's weight matrix ``G`` (``[out, d]``, see
:mod:`cl_plugins.core.layer_inputs`): ``G -> scale * G @ U U^T`` (onto span(U)) or
``G -> G - G @ U U^T`` (out of span(U)). With ``U`` of rank ``k``, the product costs
``2 * out * d * k`` multiply-adds; when ``k > d - k`` the same projector is applied through the
orthonormal complement ``V`` (rank ``d - k``): ``G U U^T = G - G V V^T``. :class:`FanInProjector`
makes that choice once, at the experience boundary, so every step pays for ``min(k, d - k)``.
:class:`LayerUpdateProjector` applies one to a layer's parameter *update* in place
(:class:`UpdateProjection`: to several layers; Adam-NSCL),
:func:`extend_basis` grows an orthonormal basis by the energy criterion (GPM).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn


def sym_eigh(matrix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and orthonormal eigenvectors of a symmetric matrix, in float64.

    float32 eigendecompositions of rank-deficient covariances turn the small eigenvalues into
    noise (and with them any threshold relative to the smallest one), hence float64.
    """
    m = matrix.to(torch.float64)
    m = 0.5 * (m + m.T)  # exact symmetry: eigh reads one triangle only
    return torch.linalg.eigh(m)


def orthonormal_complement(basis: torch.Tensor) -> torch.Tensor:
    """``[d, d - k]`` orthonormal basis of the orthogonal complement of span(``basis`` [d, k])."""
    d, k = basis.shape
    if k == 0:
        return torch.eye(d, dtype=basis.dtype, device=basis.device)
    if k >= d:
        return basis.new_zeros(d, 0)
    # I - U U^T has eigenvalue 1 on the complement and 0 on span(U).
    _, vecs = sym_eigh(torch.eye(d, dtype=torch.float64, device=basis.device)
                       - basis.double() @ basis.double().T)
    return vecs[:, k:].to(basis.dtype)


class FanInProjector:
    """``P(G) = scale * G @ U U^T`` (``mode="onto"``) or ``G - G @ U U^T`` (``mode="out_of"``).

    ``basis``: ``[d, k]`` with orthonormal columns (float64 from the decomposition; stored in
    ``dtype``). ``complement`` (optional): its orthonormal complement, when the caller already has
    it (an eigendecomposition gives both); otherwise computed when it is the cheaper side.
    ``apply`` accepts ``[out, d]`` matrices (or any ``[..., d]``) and returns the same shape.
    """

    def __init__(self, basis: torch.Tensor, mode: str = "onto", scale: float = 1.0,
                 complement: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32):
        if mode not in ("onto", "out_of"):
            raise ValueError(f"mode must be 'onto' or 'out_of'; got {mode!r}")
        if basis.dim() != 2:
            raise ValueError(f"basis must be [d, k]; got shape {tuple(basis.shape)}")
        self.d, self.rank = basis.shape
        self.mode, self.scale = mode, float(scale)
        # onto span(U):  G U U^T          = G - G V V^T
        # out of span(U): G - G U U^T     = G V V^T
        use_complement = self.rank > self.d - self.rank
        if use_complement:
            if complement is None:
                complement = orthonormal_complement(basis.double())
            self.factor = complement.to(dtype)
        else:
            self.factor = basis.to(dtype)
        # `subtract`: whether the result is G - G F F^T (else G F F^T), F the stored factor.
        self.subtract = use_complement == (mode == "onto")

    @property
    def factor_rank(self) -> int:
        return self.factor.shape[1]

    def to(self, device=None, dtype=None) -> "FanInProjector":
        self.factor = self.factor.to(device=device, dtype=dtype or self.factor.dtype)
        return self

    def apply(self, g: torch.Tensor) -> torch.Tensor:
        factor = self.factor if self.factor.dtype == g.dtype else self.factor.to(g.dtype)
        if factor.shape[1] == 0:
            out = g.clone() if self.subtract else torch.zeros_like(g)
        else:
            inner = (g @ factor) @ factor.T
            out = g - inner if self.subtract else inner
        if self.scale != 1.0:
            out = out * self.scale
        return out

    def matrix(self) -> torch.Tensor:
        """The dense ``[d, d]`` projector (for tests and inspection)."""
        return self.apply(torch.eye(self.d, dtype=self.factor.dtype, device=self.factor.device))

    def state_dict(self) -> dict:
        return {"factor": self.factor.cpu(), "mode": self.mode, "scale": self.scale,
                "subtract": self.subtract, "d": self.d, "rank": self.rank}

    @classmethod
    def from_state_dict(cls, state: dict) -> "FanInProjector":
        obj = cls.__new__(cls)
        obj.factor, obj.mode, obj.scale = state["factor"], state["mode"], state["scale"]
        obj.subtract, obj.d, obj.rank = state["subtract"], state["d"], state["rank"]
        return obj


def energy_rank(singular_values: torch.Tensor, threshold: float, total_energy: float,
                already_explained: float = 0.0) -> int:
    """Smallest k such that ``already_explained + sum_{i<k} s_i^2 >= threshold * total_energy``
    (GPM's energy criterion; ``singular_values`` sorted in decreasing order)."""
    if total_energy <= 0:
        return 0
    energy = singular_values.double().pow(2)
    cumulative = already_explained + torch.cumsum(energy, 0)
    reached = (cumulative >= threshold * total_energy).nonzero()
    return int(reached[0]) + 1 if len(reached) else len(energy)


class LayerUpdateProjector:
    """``W <- W_old + (W - W_old) @ T`` for one Linear/Conv2d layer, in place, with buffers
    allocated once per experience (two matrix products per step, no allocation).

    ``T = scale * F F^T`` or ``scale * (I - F F^T)`` (``projector.subtract``), ``F`` the
    projector's factor. ``bias_mode``: ``"append"`` (the bias is the last fan-in column, projected
    with the weight) or ``"freeze"`` (the bias is restored to its value before the step). Use:
    ``torch._foreach_copy_(old, cur)`` with ``cur, old = tensors()`` before the optimizer step,
    :meth:`project` after it.
    """

    def __init__(self, module: nn.Module, projector: FanInProjector, bias_mode: str):
        w = module.weight
        self.module = module
        self.w = w.detach().view(w.shape[0], -1)  # [out, d] view sharing storage
        self.old_w = torch.empty_like(self.w)
        self.delta_w = torch.empty_like(self.w)
        b = module.bias
        self.b = None if b is None else b.detach()
        self.old_b = None if b is None else torch.empty_like(self.b)
        self.append = b is not None and bias_mode == "append"
        self.freeze_b = b is not None and bias_mode == "freeze"
        factor = projector.factor.to(device=w.device, dtype=w.dtype)
        d = self.w.shape[1]
        self.fw = factor[:d]  # rows of the weight's fan-in
        self.fw_t = self.fw.T
        self.fb = factor[d] if self.append else None  # the bias column's row, [r]
        self.delta_b = torch.empty_like(self.b) if self.append else None
        self.tmp = self.w.new_empty(self.w.shape[0], factor.shape[1])
        self.scale, self.subtract = projector.scale, projector.subtract

    def tensors(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """``(current, old)``: the layer's tensors and their snapshot buffers."""
        cur = [self.w] + ([self.b] if self.b is not None else [])
        old = [self.old_w] + ([self.old_b] if self.b is not None else [])
        return cur, old

    def project(self) -> None:
        """w <- old + (w - old) @ T, T = scale * F F^T (or scale * (I - F F^T) if subtract)."""
        s = self.scale
        torch.sub(self.w, self.old_w, out=self.delta_w)
        if self.append:
            torch.sub(self.b, self.old_b, out=self.delta_b)
        if self.tmp.shape[1] == 0:  # empty factor: T = 0 (subtract=False) or s * I
            if self.subtract:
                torch.add(self.old_w, self.delta_w, alpha=s, out=self.w)
                if self.append:
                    torch.add(self.old_b, self.delta_b, alpha=s, out=self.b)
            else:
                self.w.copy_(self.old_w)
                if self.append:
                    self.b.copy_(self.old_b)
        else:
            torch.mm(self.delta_w, self.fw, out=self.tmp)  # [out, r] = delta @ F
            if self.append:
                self.tmp.addr_(self.delta_b, self.fb)
            if self.subtract:
                # old + s * (delta - delta F F^T)
                torch.add(self.old_w, self.delta_w, alpha=s, out=self.w)
                self.w.addmm_(self.tmp, self.fw_t, alpha=-s)
                if self.append:
                    torch.add(self.old_b, self.delta_b, alpha=s, out=self.b)
                    self.b.addmv_(self.tmp, self.fb, alpha=-s)
            else:
                # old + s * delta F F^T
                torch.addmm(self.old_w, self.tmp, self.fw_t, alpha=s, out=self.w)
                if self.append:
                    torch.addmv(self.old_b, self.tmp, self.fb, alpha=s, out=self.b)
        if self.freeze_b:
            self.b.copy_(self.old_b)


class UpdateProjection:
    """:class:`LayerUpdateProjector` over several layers (moving each projector to its layer's
    device and dtype): :meth:`snapshot` before the optimizer step, :meth:`project` after it."""

    def __init__(self, layers: Dict[str, nn.Module], projectors: Dict[str, FanInProjector],
                 bias_mode: str):
        for name, m in layers.items():
            projectors[name].to(device=m.weight.device, dtype=m.weight.dtype)
        self.steps = [LayerUpdateProjector(m, projectors[n], bias_mode) for n, m in layers.items()]
        pairs = [step.tensors() for step in self.steps]
        self._cur = [t for cur, _ in pairs for t in cur]
        self._old = [t for _, old in pairs for t in old]

    def snapshot(self) -> None:
        torch._foreach_copy_(self._old, self._cur)  # one fused copy

    def project(self) -> None:
        for step in self.steps:
            step.project()

    def zero_frozen_bias_grads(self) -> None:
        """For a gradient-side projection: frozen biases get no step."""
        for step in self.steps:
            if step.freeze_b and step.module.bias.grad is not None:
                step.module.bias.grad.zero_()


def extend_basis(basis: Optional[torch.Tensor], rep: torch.Tensor, threshold: float,
                 drop_one: bool = False) -> torch.Tensor:
    """GPM's update of an orthonormal basis ``M`` ``[d, k]`` (None: empty) with a
    representation ``R`` ``[d, n]`` (columns are inputs), in float64, returned on the CPU.

    ``R_hat = R - M M^T R``; the smallest ``r >= 0`` left singular vectors of ``R_hat`` with
    ``||M^T R||_F^2 + sum_{i<=r} s_i^2 >= threshold ||R||_F^2`` are appended (:func:`energy_rank`;
    ``drop_one``: one fewer, GPM's code rule on the first task), re-orthogonalised against ``M``
    and QR-orthonormalised; at most ``d`` columns. Singular values at most
    ``max(d, n) * eps * ||R||_F`` count as zero and are never added. The SVD runs where ``R``
    lives (except on MPS: CPU).
    """
    work = rep.device if rep.device.type != "mps" else torch.device("cpu")
    rep = rep.to(work, torch.float64)
    d, n = rep.shape
    total = float(rep.pow(2).sum())
    if basis is None:
        basis = rep.new_zeros(d, 0)
    else:
        basis = basis.to(work, torch.float64)
    if total <= 0.0 or basis.shape[1] >= d:
        return basis.cpu()
    explained = 0.0
    if basis.shape[1]:
        coeff = basis.T @ rep
        explained = float(coeff.pow(2).sum())  # ||M^T R||_F^2
        rep = rep - basis @ coeff  # R_hat
    u, s, _ = torch.linalg.svd(rep, full_matrices=False)
    tol = max(d, n) * torch.finfo(torch.float64).eps * total ** 0.5
    valid = int((s > tol).sum())
    u, s = u[:, :valid], s[:valid]
    if explained >= threshold * total or valid == 0:
        return basis.cpu()
    r = energy_rank(s, threshold, total, already_explained=explained) - int(drop_one)
    r = min(r, d - basis.shape[1])
    if r <= 0:
        return basis.cpu()
    new = u[:, :r]
    if basis.shape[1]:
        new = new - basis @ (basis.T @ new)  # re-orthogonalise against M (rounding)
    new, _ = torch.linalg.qr(new)
    return torch.cat([basis, new], dim=1).cpu()
