"""Step operators: what a projection method does to a gradient between backward and the step.

Preconditioners (RGO, :mod:`cl_plugins.projection.rgo`): a protected tensor's gradient, viewed as
``G = grad.reshape(-1, d)`` (a weight ``[out, d]``, a bias ``[1, out]``), becomes
``(d / trace P) G P`` with P a float64 ``d x d`` matrix kept by recursive least squares
(:func:`rls_update`). :func:`preconditioner_step` builds the cheapest exact operator from P:

- :class:`DenseStep`: ``G A`` with ``A = (d / trace P) P`` (the scale folded in);
- :class:`LowRankStep`: ``(d / trace P) (G - (G U) diag(c) U^T)``, U the eigenvectors of P with
  ``c = 1 - eigenvalue > 1e-10``, used when ``I - P`` has rank r with ``2 r < d`` (cheaper then);
  the eigendecomposition is skipped once P has absorbed d / 2 vectors or more;
- :class:`FactoredStep`: wraps either for an ``nn.Linear`` weight (see its docstring).

The three share one interface: ``form`` (``"dense"`` | ``"low_rank"``), ``d``,
``right_multiply(m)`` (``m [k, d] -> (d / trace P) m P``, a new tensor), ``step_(grad)`` (in
place; ``None`` is skipped), ``clear()`` (drops per-iteration records) and ``detach()`` (removes
hooks).

Orthogonal projection (OGD, :mod:`cl_plugins.projection.ogd`): :class:`ComplementStep` projects
the gradients of a fixed list of parameters off the span of stored orthonormal directions, and
:class:`GramSchmidt` orthonormalises new directions against them.

:func:`plain_sgd_problems` lists what makes an optimizer's step differ from ``-lr * grad`` and
:func:`warn_unless_plain_sgd` warns about it: both methods' guarantees assume the optimizer steps
along the gradient they leave.
"""

from __future__ import annotations

import warnings
from typing import Iterable, List, Optional

import torch
from torch import nn

LOW_RANK_TOL = 1e-10  # components of I - P below this are dropped from the low-rank form
GS_BLOCK = 16  # vectors orthonormalised vector by vector together (GramSchmidt.add)
UPCAST_ROWS = 4096  # rows of S upcast to float64 at a time (into one reused buffer)
# Directions read per block in ComplementStep on a CPU: a block this size stays in a core's cache
# between its two matrix-vector products, so S is read from memory once per step, not twice.
STEP_BLOCK_BYTES = 2 * 2**20


# ------------------------------------------------------------------------ preconditioners

def rls_update(P: torch.Tensor, vectors: torch.Tensor, alpha: float) -> torch.Tensor:
    """P after absorbing the rows of ``vectors`` ([m, d]) one by one, in place:
    k = P g, P <- P - k k^T / (alpha + g^T k). For m > 1 the identical block (Woodbury) form
    P - P G (alpha I + G^T P G)^-1 G^T P is used."""
    if vectors.shape[0] == 1:
        g = vectors[0]
        k = P @ g
        k.div_(torch.sqrt(alpha + torch.dot(g, k)))
        # one fused pass P - k' k'^T (k' = k / sqrt(alpha + g^T k)): exactly symmetric
        # elementwise (k'_i k'_j = k'_j k'_i), so P stays exactly symmetric
        P.addr_(k, k, alpha=-1.0)
        return P
    K = P @ vectors.T  # [d, m]
    S = vectors @ K
    S.diagonal().add_(alpha)
    P.sub_(K @ torch.linalg.solve(S, K.T))
    P.copy_(0.5 * (P + P.T))
    return P


class _RightStep:
    """``step_`` and the no-op ``clear``/``detach`` of an operator defined by its
    ``right_multiply`` (the subclasses')."""
    form = ""
    d = 0

    def step_(self, grad: Optional[torch.Tensor]) -> None:
        if grad is not None:
            grad.copy_(self.right_multiply(grad.reshape(-1, self.d)).view(grad.shape))

    def clear(self) -> None:
        pass

    def detach(self) -> None:
        pass


class DenseStep(_RightStep):
    form = "dense"

    def __init__(self, A: torch.Tensor):
        self.A, self.d = A, A.shape[0]

    def right_multiply(self, m: torch.Tensor) -> torch.Tensor:
        return m @ self.A


class LowRankStep(_RightStep):
    form = "low_rank"

    def __init__(self, U: torch.Tensor, c: torch.Tensor, scale: float):
        self.U, self.c, self.scale, self.d = U, c, scale, U.shape[0]

    def right_multiply(self, m: torch.Tensor) -> torch.Tensor:
        return torch.addmm(m, (m @ self.U).mul_(self.c), self.U.T, alpha=-1.0).mul_(self.scale)


def preconditioner_step(P: torch.Tensor, n_vectors: int, dtype: torch.dtype) -> _RightStep:
    """The step ``m -> (d / trace P) m P`` of a float64 P that absorbed ``n_vectors`` RLS
    vectors, in ``dtype``: low-rank when ``I - P`` has rank r with 2 r < d, else dense."""
    d = P.shape[0]
    scale = d / float(torch.trace(P))
    if 2 * n_vectors < d:
        evals, evecs = torch.linalg.eigh(P)
        c = 1.0 - evals
        keep = c > LOW_RANK_TOL
        if 2 * int(keep.sum()) < d:
            return LowRankStep(evecs[:, keep].to(dtype).contiguous(), c[keep].to(dtype), scale)
    return DenseStep((scale * P).to(dtype))


class FactoredStep:
    """An ``nn.Linear`` weight's step through the layer's recorded inputs.

    The weight gradient of a batch is ``D^T X`` (D the layer's output gradients, X its inputs, n
    rows), so ``(D^T X) M = D^T (X M)`` costs ``n d^2`` instead of ``out d^2`` -- 25x less for a
    256-wide layer at batch 10; used when n < out. The recorded pairs are checked against the
    actual gradient on 2 fixed random directions v: if ``||(grad - D^T X) v|| > 1e-4 ||grad v||``
    for either (another plugin's loss term on the weight, a recorded forward that is not part of
    this step, ...), the dense product ``grad M`` is used, so the result is ``grad M`` up to float
    rounding (a residual of 10% of the gradient escapes both directions with probability ~1e-6 per
    step). Meant for the CPU: on an accelerator the dense product is cheap and the check would
    cost a host synchronisation.
    """

    def __init__(self, inner: _RightStep, module: nn.Linear):
        self.inner, self.form, self.d = inner, inner.form, inner.d
        self.records: List[list] = []  # [inputs [n, d], output gradients [n, out] or None]
        self._probe = None  # the check's 2 random directions [d]
        records = self.records

        def hook(mod, inputs, output):
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            entry = [inputs[0].detach().reshape(-1, mod.in_features), None]
            records.append(entry)

            def grad_hook(grad, entry=entry):
                entry[1] = grad.detach().reshape(-1, grad.shape[-1])

            output.register_hook(grad_hook)

        self._hook = module.register_forward_hook(hook)

    def right_multiply(self, m: torch.Tensor) -> torch.Tensor:
        return self.inner.right_multiply(m)

    def clear(self) -> None:
        self.records.clear()

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.records.clear()

    def _explains(self, g2: torch.Tensor, x: torch.Tensor, dz: torch.Tensor) -> bool:
        """Whether ``g2 = dz^T x`` on both probe directions (to 1e-4 relative)."""
        if self._probe is None or self._probe[0].dtype != g2.dtype:
            gen = torch.Generator().manual_seed(0)
            self._probe = [torch.randn(self.d, generator=gen).to(g2.dtype) for _ in range(2)]
        for v in self._probe:  # matrix-vector products: far cheaper than one [d, 2] product
            gv = torch.mv(g2, v)
            if float((gv - torch.mv(dz.T, torch.mv(x, v))).norm()) > 1e-4 * float(gv.norm()):
                return False
        return True

    def step_(self, grad: Optional[torch.Tensor]) -> None:
        pairs = [(x, dz) for x, dz in self.records if dz is not None]
        self.records.clear()
        if grad is None:
            return
        g2 = grad.reshape(-1, self.d)
        if pairs and sum(x.shape[0] for x, _ in pairs) < g2.shape[0]:
            x = torch.cat([x for x, _ in pairs]) if len(pairs) > 1 else pairs[0][0]
            dz = torch.cat([dz for _, dz in pairs]) if len(pairs) > 1 else pairs[0][1]
            x, dz = x.to(grad.dtype), dz.to(grad.dtype)
            if self._explains(g2, x, dz):
                if grad.is_contiguous():  # g2 is a view of grad: write the product in place
                    torch.mm(dz.T, self.right_multiply(x), out=g2)
                else:
                    grad.copy_((dz.T @ self.right_multiply(x)).view(grad.shape))
                return
        grad.copy_(self.right_multiply(g2).view(grad.shape))


# -------------------------------------------------------------------- orthogonal projection

class ComplementStep:
    """``g <- g - S (S^T g)`` on the ``.grad`` of a fixed list of parameters (one dtype and
    device), S^T = ``directions`` ([m, n_params], orthonormal rows, the parameters' order).

    The gradients are gathered into one flat buffer (allocated once), projected block of rows of
    S^T by block -- on a CPU ~``STEP_BLOCK_BYTES`` per block, whose two matrix-vector products
    then run back to back while it is in cache (on a GPU: one block) -- and written back. Each
    block sees the gradient already projected off the blocks before it: with orthonormal
    directions that is the same projection (like modified against classical Gram-Schmidt). A
    parameter whose ``.grad`` is None counts as a zero gradient and gets the projected one.
    """

    def __init__(self, params: Iterable[torch.Tensor]):
        self.slices, rows = [], 0
        for p in params:
            self.slices.append((p, rows, rows + p.numel()))
            rows += p.numel()
        first = self.slices[0][0]
        self.flat = torch.empty(rows, device=first.device, dtype=first.dtype)

    @torch.no_grad()
    def step_(self, directions: torch.Tensor) -> None:
        if all(p.grad is None for p, _, _ in self.slices):
            return  # no gradient at all: nothing to project
        flat, n = self.flat, self.flat.numel()
        for p, r0, r1 in self.slices:
            if p.grad is None:
                flat[r0:r1].zero_()
            else:
                flat[r0:r1].view_as(p).copy_(p.grad)
        d = directions
        rows = d.shape[0] if d.is_cuda else max(1, STEP_BLOCK_BYTES // (n * d.element_size()))
        for j0 in range(0, d.shape[0], rows):
            block = d[j0:j0 + rows]
            flat.addmv_(block.T, block @ flat, alpha=-1)
        for p, r0, r1 in self.slices:
            if p.grad is None:
                p.grad = flat[r0:r1].view_as(p).clone()
            else:
                p.grad.copy_(flat[r0:r1].view_as(p))


class GramSchmidt:
    """Sequential Gram-Schmidt, in float64, of a stream of vectors against a stored basis S
    ([n, m] columns, any dtype) and the vectors already accepted from the stream, with the drop
    rule ``||residual|| <= tol * ||raw vector||``. Buffers are allocated once per pass: on a CPU
    fresh multi-megabyte allocations (page faults) would cost more than the arithmetic."""

    def __init__(self, basis: Optional[torch.Tensor], n: int, capacity: int, tol: float,
                 device):
        self.basis = basis if basis is not None and basis.shape[1] else None
        self.tol = tol
        self.fresh = torch.empty(capacity, n, dtype=torch.float64, device=device)
        self.k = 0  # accepted rows of self.fresh
        self.buf = None
        if self.basis is not None and self.basis.dtype != torch.float64:
            self.buf = torch.empty(min(UPCAST_ROWS, n), self.basis.shape[1],
                                   dtype=torch.float64, device=device)

    def _rows(self, r0: int) -> torch.Tensor:
        """Rows r0 .. r0 + UPCAST_ROWS of S, in float64."""
        blk = self.basis[r0:r0 + UPCAST_ROWS]
        if self.buf is None:
            return blk
        return self.buf[:blk.shape[0]].copy_(blk)

    def project_out_basis_(self, v: torch.Tensor) -> None:
        """v [b, n] <- v - (v S) S^T: classical Gram-Schmidt against S (the caller repeats it
        to re-orthogonalise)."""
        if self.basis is None:
            return
        n = self.basis.shape[0]
        coef = torch.zeros(v.shape[0], self.basis.shape[1], dtype=torch.float64, device=v.device)
        for r0 in range(0, n, UPCAST_ROWS):
            coef.addmm_(v[:, r0:r0 + UPCAST_ROWS], self._rows(r0))
        for r0 in range(0, n, UPCAST_ROWS):
            v[:, r0:r0 + UPCAST_ROWS].addmm_(coef, self._rows(r0).T, alpha=-1)

    def add(self, v: torch.Tensor) -> None:
        """Orthonormalise the rows of v [b, n] (float64, overwritten) in order; keep the
        residuals that pass the drop rule. Each batch is projected out of S twice ("twice is
        enough"), then, in blocks of ``GS_BLOCK``, out of the vectors already accepted twice,
        then each vector out of the ones accepted before it in its block twice."""
        ref = v.norm(dim=1)
        for _ in range(2):
            self.project_out_basis_(v)
        for b0 in range(0, v.shape[0], GS_BLOCK):
            block = v[b0:b0 + GS_BLOCK]
            if self.k:
                old = self.fresh[:self.k]
                for _ in range(2):
                    block.addmm_(block @ old.T, old, alpha=-1)
            k0 = self.k
            for i in range(block.shape[0]):
                r = block[i]
                if self.k > k0:  # the vectors accepted from this block so far
                    new = self.fresh[k0:self.k]
                    for _ in range(2):
                        r.addmv_(new.T, new @ r, alpha=-1)
                norm = r.norm()
                if norm > 0 and norm > self.tol * ref[b0 + i]:
                    torch.div(r, norm, out=self.fresh[self.k])
                    self.k += 1

    def result(self) -> torch.Tensor:
        """The accepted vectors [k, n], re-orthonormalised once more without dropping: the
        within-block steps leave rounding along S and earlier vectors of the order of
        eps * ||raw|| / ||residual||, which normalisation amplifies for small residuals. One more
        projection out of S and a Cholesky-QR pass (stable here: the rows are orthonormal to
        ~eps / tol already, so their Gram matrix is ~I) bring it back to float64 rounding."""
        f = self.fresh[:self.k]
        if not self.k:
            return f
        self.project_out_basis_(f)
        chol = torch.linalg.cholesky(f @ f.T)
        return torch.linalg.solve_triangular(chol, f, upper=False)


# ------------------------------------------------------------------------------ optimizer

def plain_sgd_problems(optimizer) -> List[str]:
    """What makes ``optimizer``'s step differ from ``-lr * grad`` (empty for plain SGD): another
    optimizer class, momentum, weight decay, Nesterov, per parameter group."""
    if type(optimizer) is not torch.optim.SGD:
        return [f"optimizer {type(optimizer).__name__}"]
    problems = []
    for i, group in enumerate(optimizer.param_groups):
        for key in ("momentum", "weight_decay"):
            if group.get(key, 0):
                problems.append(f"param_groups[{i}] {key}={group[key]}")
        if group.get("nesterov", False):
            problems.append(f"param_groups[{i}] nesterov=True")
    return problems


def warn_unless_plain_sgd(optimizer, message: str) -> bool:
    """Warn (``UserWarning``) with ``message.format(problems=...)`` when ``optimizer`` is not
    plain SGD; returns whether it warned (False also for ``optimizer=None``)."""
    problems = [] if optimizer is None else plain_sgd_problems(optimizer)
    if problems:
        warnings.warn(message.format(problems=", ".join(problems)), UserWarning, stacklevel=3)
    return bool(problems)
