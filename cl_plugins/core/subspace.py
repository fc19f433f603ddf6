"""Fan-in subspaces: eigendecompositions in float64 and projectors applied to weight updates.

A projector here acts on the fan-in side of a layer's weight matrix ``G`` (``[out, d]``, see
:mod:`cl_plugins.core.layer_inputs`): ``G -> scale * G @ U U^T`` (onto span(U)) or
``G -> G - G @ U U^T`` (out of span(U)). With ``U`` of rank ``k``, the product costs
``2 * out * d * k`` multiply-adds; when ``k > d - k`` the same projector is applied through the
orthonormal complement ``V`` (rank ``d - k``): ``G U U^T = G - G V V^T``. :class:`FanInProjector`
makes that choice once, at the experience boundary, so every step pays for ``min(k, d - k)``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


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
