"""The span of stored gradient directions that a step is projected off (OGD), dense or factored.

:class:`DirectionStore` holds S (orthonormal columns, the shared parameters' flat order) in one of
two storages, with the same projection ``g <- g - S S^T g``:

- ``"dense"``: S^T itself ([m, n_params], the parameters' dtype), new vectors orthonormalised by
  :class:`~cl_plugins.core.step_operators.GramSchmidt` (float64), the step by
  :class:`~cl_plugins.core.step_operators.ComplementStep`;
- ``"factored"``: :class:`~cl_plugins.core.factored_directions.FactoredDirections`, when every
  protected parameter is an ``nn.Linear`` weight or bias (one (input, output-gradient) pair per
  layer and vector, and a Cholesky factor).

``storage="auto"`` takes the factored one when the model allows it: decided on the first vectors
added (a layer called twice per forward, or on a 3-D input, shows only then), with the dense one
used from then on otherwise. The choice is part of the state. The factored storage decides the drop
rule from Gram matrices, which resolve relative residuals down to about 1e-7 in float64: below
``FACTORED_MIN_TOL`` (1e-6) of ``drop_tol``, "auto" takes the dense storage and "factored" raises.

The factored step takes t = V^T g from the step's layer inputs when it can (``begin_step`` /
``end_step`` around each training iteration, ``core.step_capture``): for a layer called on n
rows, g = Delta^T X, so t = rowsum((D Delta^T) * (A X^T)) costs m n (in + out) instead of
m in out, which halves the step's arithmetic when n is small (P1: n = 10). Whatever else is in
the gradient (another plugin's penalty, a forward outside the capture) is R = g - Delta^T X; its
part of t is added the usual way unless |R| is within the rounding bound of Delta^T X. Under
torch.distributed (averaged gradients) and for a layer without a complete capture, t is taken
from the gradient itself.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from .distributed import is_distributed
from .factored_directions import (FactoredDirections, NotFactorable, block_inner, linear_blocks,
                                  output_factors)
from .step_capture import LinearStepCapture
from .step_operators import ComplementStep, GramSchmidt

STORAGES = ("auto", "dense", "factored")
FACTORED_MIN_TOL = 1e-6


def check_storage(storage: str, drop_tol: float) -> str:
    """``storage`` if valid with ``drop_tol``; the error names both."""
    from .checks import check_choice

    check_choice("storage", storage, STORAGES)
    if storage == "factored" and drop_tol < FACTORED_MIN_TOL:
        raise ValueError(f"storage='factored' needs drop_tol >= {FACTORED_MIN_TOL} (its Gram "
                         f"matrices cannot resolve smaller residuals); got drop_tol={drop_tol!r}. "
                         "Use storage='dense' or 'auto'")
    return storage


class DirectionStore:
    def __init__(self, storage: str = "auto", drop_tol: float = 1e-5):
        self.storage, self.drop_tol = storage, drop_tol
        self.directions: Optional[torch.Tensor] = None  # dense S^T, [m, n_params]
        self.factored: Optional[FactoredDirections] = None
        self._step = None  # dense: ComplementStep; factored: [(weight, bias or None)]
        self._model = None
        self._capture = LinearStepCapture()  # factored: the step's layer inputs
        self._captured_model = None

    @property
    def form(self) -> Optional[str]:
        """``"dense"`` | ``"factored"``, None until vectors were first added."""
        if self.factored is not None:
            return "factored"
        return None if self.directions is None else "dense"

    @property
    def m(self) -> int:
        if self.factored is not None:
            return self.factored.m
        return 0 if self.directions is None else int(self.directions.shape[0])

    @property
    def memory_bytes(self) -> int:
        if self.factored is not None:
            return self.factored.memory_bytes
        d = self.directions
        return 0 if d is None else d.numel() * d.element_size()

    def basis(self) -> Optional[torch.Tensor]:
        """S, [n_params, m]: dense, a view; factored, V R^-1 in float64."""
        if self.factored is not None:
            return self.factored.dense()
        return None if self.directions is None else self.directions.T

    def to(self, device, dtype) -> None:
        if self.factored is not None:
            self.factored.to(device, dtype)
        elif self.directions is not None:
            self.directions = self.directions.to(device=device, dtype=dtype).contiguous()

    def add(self, model, params: Dict[str, torch.Tensor], batches: List[tuple], variant: str,
            dense_rows: Callable, check: Callable[[int, int], None]) -> int:
        """Orthonormalise the output gradients of ``batches`` (``(x, y, task)``, model in eval
        mode) against S, keep those that pass the drop rule; returns how many were kept.
        ``dense_rows(model, params, x, y, variant, task)`` gives them as rows [b, n_params]
        (float64); ``check(m_new, k)`` runs before anything is stored (it may raise)."""
        first = next(iter(params.values()))
        blocks = linear_blocks(model, params) if self.form != "dense" else None
        if self.form is None and self.storage != "dense" and self.drop_tol >= FACTORED_MIN_TOL:
            try:
                if blocks is None:
                    raise NotFactorable("a protected parameter is not an nn.Linear weight or bias")
                self.factored = FactoredDirections(
                    [(mod.in_features, mod.out_features, b is not None) for mod, _, b in blocks])
                factors = [output_factors(model, blocks, x, y, variant, t) for x, y, t in batches]
            except NotFactorable as err:
                self.factored = None
                if self.storage == "factored":
                    raise ValueError(f"storage='factored': {err}; use storage='dense' or 'auto' "
                                     "for this model") from err
        elif self.factored is not None:
            factors = [output_factors(model, blocks, x, y, variant, t) for x, y, t in batches]
        self._step = None
        if self.factored is not None:
            merged = [(torch.cat([f[i][0] for f in factors]), torch.cat([f[i][1] for f in factors]))
                      for i in range(len(self.factored.blocks))]
            return self.factored.add(merged, self.drop_tol, first.dtype, check)
        n, gs = sum(p.numel() for p in params.values()), None
        total = sum(len(x) for x, _, _ in batches)
        for x, y, t in batches:  # streamed: one batch of float64 rows at a time
            rows = dense_rows(model, params, x, y, variant, t)
            if gs is None:  # rows per sample: 1, or the number of outputs for "all"
                per_sample = len(rows) // max(1, len(x))
                gs = GramSchmidt(self.basis(), n, total * per_sample, self.drop_tol, first.device)
            gs.add(rows)
        new = gs.result()
        check(self.m + new.shape[0], new.shape[0])
        block = new.to(device=first.device, dtype=first.dtype)
        self.directions = block.contiguous() if self.directions is None else torch.cat(
            [self.directions, block], dim=0)
        return int(new.shape[0])

    @property
    def capture(self) -> LinearStepCapture:
        """The step's layer inputs (``core.step_capture``), factored storage only."""
        return self._capture

    def begin_step(self, model, params_of: Callable) -> None:
        """Capture this training step's layer inputs (factored storage with directions only)."""
        if self.factored is None or not self.m or is_distributed():
            return
        if self._captured_model is not model:
            blocks = linear_blocks(model, params_of(model))
            self._capture.attach([mod for mod, _, _ in blocks] if blocks else [])
            self._captured_model = model
        self._capture.start()

    def end_step(self) -> None:
        self._capture.stop()

    def step_(self, model, params_of: Callable) -> None:
        """``.grad <- .grad - S S^T .grad`` on the protected parameters (``params_of(model)``,
        called when the model changes; a None gradient counts as 0)."""
        if not self.m:
            return
        if self._step is None or self._model is not model:
            self._model, params = model, params_of(model)
            if self.factored is not None:
                self._step = [(params[w], params[b] if b else None)
                              for _, w, b in linear_blocks(model, params)]
            else:
                self._step = ComplementStep(params.values())
        if self.factored is None:
            self._step.step_(self.directions)
            return
        for p in (p for pair in self._step for p in pair if p is not None):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [(w.grad, None if b is None else b.grad) for w, b in self._step]
        pairs = self._capture.pairs() if self._captured_model is model else None
        self.factored.project_(grads, None if pairs is None else
                               inner_from_inputs(self.factored, pairs, grads))

    @torch.no_grad()
    def project(self, g: torch.Tensor) -> torch.Tensor:
        """g - S (S^T g) for a flat g [n_params]; a copy of g if S is empty."""
        if not self.m:
            return g.clone()
        if self.factored is not None:
            out = g.clone()
            self.factored.to(g.device, g.dtype)
            self.factored.project_(self.factored.flat_split(out))
            return out
        d = self.directions.to(g.device, g.dtype)
        return g - d.T @ (d @ g)

    def state_dict(self) -> dict:
        return {"basis": None if self.directions is None else
                self.directions.detach().T.cpu().contiguous(),  # dense S, [n_params, m]
                "factored": None if self.factored is None else self.factored.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.directions = None if state["basis"] is None else state["basis"].T.contiguous()
        self.factored = None if state.get("factored") is None else \
            FactoredDirections.from_state(state["factored"])
        self._step = self._model = self._captured_model = None
        self._capture.detach()


@torch.no_grad()
def inner_from_inputs(fd: FactoredDirections, pairs, grads) -> torch.Tensor:
    """t = V^T g from each block's step inputs ``(X [n, in], Delta [n, out])`` (module
    docstring), plus the part of whatever else the gradient holds when it exceeds rounding."""
    t = 0
    for (_, _, bias), a, d, (x, dlt), (gw, gb) in zip(fd.blocks, fd.A, fd.D, pairs, grads):
        x, dlt = x.to(a.dtype), dlt.to(a.dtype)
        ax = a @ x.T  # [m, n]
        if bias:
            ax += 1.0  # the bias is a weight on a constant-1 input
        t = t + ((d @ dlt.T) * ax).sum(1)
        rest_w = gw - dlt.T @ x  # autograd computes the same product: usually exactly 0
        rest_b = gb - dlt.sum(0) if bias else None
        residual = float(rest_w.norm()) + (0.0 if rest_b is None else float(rest_b.norm()))
        if residual > 0.0:
            n = x.shape[0]  # |fl(Delta^T X) - Delta^T X| <= n eps |Delta|_F |X|_F (and 1s)
            tol = n * torch.finfo(a.dtype).eps * float(dlt.norm()) * (float(x.norm()) + n ** 0.5)
            if residual > tol:
                t = t + block_inner(a, d, rest_w, rest_b)
    return t
