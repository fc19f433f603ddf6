"""Orthogonal Gradient Descent (OGD): steps orthogonal to old tasks' output gradients.

Name: ``ogd``. Scenarios: task-, domain- and class-IL. Task labels: not needed (used, when the
model is multi-head, to pick each stored sample's own head).

Paper: M. Farajtabar, N. Azizan, A. Mott, A. Li, "Orthogonal Gradient Descent for Continual
Learning", AISTATS 2020 (arXiv 1910.07104). We know of no official code release. Facts marked
"as we recall" below come from our reading of the paper and could not be re-checked against the
PDF here (no network): verify them before quoting.

Idea: a small step dw changes the output f_j(x; w) of an old sample by
<grad_w f_j(x; w), dw> to first order. OGD keeps, after each task, the gradients of the model's
outputs on a sample of that task's data, and projects every later gradient onto the orthogonal
complement of their span, so that to first order the old outputs do not move.

Equations (Algorithm 1; S = the stored, orthonormal directions, an [n_params, m] matrix):

    training on task t > 1:   g  <-  g - S (S^T g)          (= g - sum_{v in S} proj_v(g))
                              w  <-  w - eta g               (the base optimizer; SGD in the paper)
    after training task t:    for each stored sample (x, y) and each output j of the variant:
                                  u <- grad_w f_j(x; w) - S (S^T grad_w f_j(x; w))
                                  if ||u|| > drop_tol ||grad_w f_j(x; w)||:  S <- [S, u / ||u||]

Variants (``variant``): which outputs f_j are kept per sample, f = the logits:

- ``"gtl"`` (OGD-GTL, default): the ground-truth logit f_y(x) only; one vector per sample. The
  paper found it at least as good as the other two and uses it for its main results (as we
  recall); it is also the cheapest.
- ``"ave"`` (OGD-AVE): the average of the logits, (1/c) sum_j f_j(x); one vector per sample.
- ``"all"`` (OGD-ALL): every logit f_1 .. f_c; c vectors per sample (c times the memory).

The algorithm stores the unnormalised residuals u and projects with sum_v <g, v> v / <v, v>; since
the u are mutually orthogonal this is exactly the orthogonal projection onto their span, which is
what S (S^T g) computes with the normalised u.

Parameters: the shared parameters (``core.params.shared_parameters``: every trainable parameter
except task-specific heads). With one shared head (Permuted/Rotated MNIST in the paper, domain-IL,
class-IL with a ``MaskedHead``) the head is part of S. With a ``MultiHeadClassifier`` (Split MNIST
in the paper, task-IL) each stored sample's logits come from its own task's head, the heads are
outside S, and the current head's gradient is not projected (no old task uses it).

Hooks:

- ``before_training_exp``: checks that the shared parameters still have the stored layout (names,
  shapes, one dtype), puts S on ``strategy.device`` in the parameters' dtype, caches the
  parameters and their row ranges in S, warns once if the optimizer is not plain SGD.
- ``before_update`` (after backward, before ``optimizer.step()``): the projection above, in place
  on the ``.grad`` of the shared parameters: the gradients are copied into one flat buffer
  (n_params values, reused), projected, and copied back. S is stored transposed (``directions``,
  one direction per contiguous row); on a CPU the two matrix-vector products run block by block
  of ~2 MiB of rows, so each block is still in cache for the second product and S crosses the
  memory bus once per step instead of twice (on a GPU: one block). A shared parameter whose
  ``.grad`` is None is treated as having a zero gradient; its projected gradient is written to
  ``.grad``.
- ``after_training_exp``: draws ``memory_per_task`` samples of the experience's training data
  (eval transforms) with this plugin's generator, computes the variant's output gradients per
  sample with ``core.per_sample.per_sample_gradients`` (``torch.func``, model in eval mode; no
  Python loop over samples; a loop over classes for ``"all"``), and appends their Gram-Schmidt
  residuals to S.

Hyper-parameters (defaults = the paper's MNIST protocol as we recall it):

- ``variant`` (default ``"gtl"``): ``"gtl"``, ``"ave"`` or ``"all"``.
- ``memory_per_task`` (int >= 1, default 200): samples stored per task (the paper keeps 200
  gradients per task on Permuted, Rotated and Split MNIST, as we recall, the same budget as the
  samples A-GEM stores). ``"all"`` keeps up to c times as many vectors. All samples are used
  when the experience has fewer.
- ``max_directions`` (int >= 1 or None, default None = unbounded): a cap on the columns of S.
  Memory grows with every task: S takes n_params * m * 4 bytes in float32 (the P1 MLP
  784-100-100-10 without biases has 89,400 parameters: 200 directions per task for 10 tasks are
  2,000 columns, 715 MB) and every step reads it twice. If a task would take S beyond the cap,
  ``after_training_exp`` raises a ValueError that says by how much, and leaves the state as it
  was: the paper has no rule for dropping directions, and silently dropping old tasks' directions
  (or the new task's) would change the method.
- ``drop_tol`` (in [0, 1), default 1e-5): a vector whose Gram-Schmidt residual has norm
  <= drop_tol * (its own norm) is dropped (it is, up to rounding, in the span of S already).
  1e-5 is about 100 float32 machine epsilons: gradients computed in float32 carry ~1e-7 relative
  rounding, so smaller residuals are noise, and normalising them would add random directions.
  The paper appends every residual; with exact arithmetic the two differ only on exactly
  dependent vectors, where the paper's u is 0.
- ``grad_batch_size`` (int >= 1, default 64): output-gradient vectors computed at once in the
  memory pass (samples per vmap call; for ``"all"`` grad_batch_size // c samples). Trades memory
  for speed only.
- ``seed`` (int >= 0, default 0): seeds the ``torch.Generator`` that draws the stored samples;
  its state is part of ``state_dict()``.

Paper protocol (MNIST, as we recall it): MLP 784-100-100-10 with ReLU, SGD lr 1e-3, batch 10,
5 epochs per task, 5 tasks, 200 stored gradients per task, OGD-GTL. It uses plain SGD: with
momentum, Nesterov, weight decay or Adam the optimizer's step is no longer the projected
gradient (momentum mixes in unprojected history; weight decay adds an unprojected term inside the
step; Adam rescales coordinates), so the guarantee is lost; the plugin warns and still projects
the gradient the optimizer sees.

Numerics: Gram-Schmidt runs in float64 (S is upcast 4096 rows at a time into one reused
buffer), as the paper's sequential algorithm with "twice is enough" re-orthogonalisation: each
batch of new vectors is projected out of S twice, then, in blocks of 16, out of the vectors
already accepted for this task twice, then each vector out of the ones accepted before it in its
block twice, and the drop rule decides. Small kept residuals amplify rounding when normalised, so
the accepted vectors are finally projected out of S once more and re-orthonormalised by one
Cholesky-QR pass (well conditioned: their Gram matrix is ~I), which keeps S orthonormal to float64
rounding whatever drop_tol. The float64 work buffer holds memory_per_task (x c for ``"all"``)
vectors of n_params. S itself is kept in the shared parameters' dtype (float32 normally, float64
for float64 models), one copy, on ``strategy.device``; the step's matrix-vector products run in
that dtype.

Deviations from the paper, and why:

- ``drop_tol`` (above): near-dependent vectors are dropped instead of normalising rounding noise.
- S is normalised and kept in the parameters' dtype (float32): a float64 copy would triple the
  memory of the method's dominant cost for an orthogonality already at float32 rounding.
- Task-specific heads are not in S (with one shared head nothing changes). Algorithm 1 takes
  gradients w.r.t. all weights w: with one head per task, a stored vector v of task k has a
  part on head k, so the projection of a later gradient (zero on head k) gets a component on
  head k, and OGD as written would move old heads to compensate the shared parameters' change
  (<v_shared, dw_shared> + <v_head_k, dw_head_k> = 0). Here S covers the shared parameters
  only: old heads never move, and each stored output is protected by the shared step alone
  (<v_shared, dw_shared> = 0, the stricter constraint), as every method of this library treats
  task heads (``core.params.shared_parameters``). The current task's head gradient is not
  projected.
- The samples are a uniform random subset of the experience's training data drawn with a seeded
  generator (the paper does not say how the 200 are chosen).
- ``supports_distributed = False``: S is not all-reduced across ranks.

Cost: per step, two products with S (n_params * m multiply-adds each) reading S once (blocked,
above), memory-bound on a CPU, so the ratio to naive's step grows linearly with m and is far
above the 1.3x target of the cheaper families: it is the method's own cost (the paper lists the
memory as its main limitation). On the P1 MLP 784-100-100-10 without biases (89,400 parameters),
batch 10, plain SGD, one thread of this 2-core CPU with another job running, the projection adds
4.9 ms per step at m = 200 (S 68 MiB), 22 ms at m = 1,000 and 38 ms at m = 1,800 (S 614 MiB;
~17 GB/s, one core's memory bandwidth); without the blocking 6.0 / 27 / 47 ms. A P1 run (9 tasks
of 27,000 steps with S growing by 200 per task) therefore spends ~1.5 h in the projection on
this CPU. On a GPU the two matrix-vector products are a fraction of a millisecond at these sizes.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule

from cl_plugins.core.checks import check_choice, check_int, check_range
from cl_plugins.core.layer_inputs import iterate_batches
from cl_plugins.core.params import shared_parameters
from cl_plugins.core.per_sample import per_sample_gradients
from cl_plugins.core.state import check_owner, owned_by

VARIANTS = ("gtl", "ave", "all")
GS_BLOCK = 16  # vectors orthonormalised vector by vector together (see "Numerics")
UPCAST_ROWS = 4096  # rows of S upcast to float64 at a time (into one reused buffer)
# Directions read per block in the CPU step: a block this size stays in a core's cache between
# its two matrix-vector products, so S is read from memory once per step instead of twice.
STEP_BLOCK_BYTES = 2 * 2**20


def _gtl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, target.view(1, 1)).sum()


def _ave(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return logits.mean()


def _logit(c: int):
    def f(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return logits[0, c]
    return f


class _Orthonormaliser:
    """Sequential Gram-Schmidt, in float64, of a stream of vectors against the stored basis S
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
        residuals that pass the drop rule."""
        ref = v.norm(dim=1)
        for _ in range(2):  # "twice is enough"
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


class OGDPlugin(SupervisedPlugin):
    METHOD_NAME = "ogd"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    DEFAULTS: dict = {"variant": "gtl", "memory_per_task": 200, "max_directions": None,
                      "drop_tol": 1e-5, "grad_batch_size": 64, "seed": 0}
    SWEEP: dict = {"memory_per_task": {"values": [50, 100, 200, 400]},
                   "variant": {"values": list(VARIANTS)}}
    PAPER = "OGD (Farajtabar, Azizan, Mott & Li, AISTATS 2020)"
    SUMMARY = ("project each gradient onto the orthogonal complement of stored output gradients "
               "(ground-truth logit) of old tasks' samples")
    supports_distributed = False

    def __init__(self, variant: str = "gtl", memory_per_task: int = 200,
                 max_directions: Optional[int] = None, drop_tol: float = 1e-5,
                 grad_batch_size: int = 64, seed: int = 0):
        super().__init__()
        self.variant = check_choice("variant", variant, VARIANTS)
        self.memory_per_task = check_int("memory_per_task", memory_per_task, 1)
        if max_directions is not None:
            check_int("max_directions", max_directions, 1)
        self.max_directions = max_directions
        self.drop_tol = float(check_range("drop_tol", drop_tol, 0.0, 1.0, high_inclusive=False))
        self.grad_batch_size = check_int("grad_batch_size", grad_batch_size, 1)
        self.seed = check_int("seed", seed, 0)
        self.generator = torch.Generator().manual_seed(seed)
        # S^T, [m, n_params]: one orthonormal direction per contiguous row (``basis`` = S)
        self.directions: Optional[torch.Tensor] = None
        self.layout: List[Tuple[str, Tuple[int, ...]]] = []  # (name, shape) per row block of S
        self.directions_per_exp: List[int] = []
        self.memory_indices: List[List[int]] = []  # stored samples (dataset indices) per exp
        self._cache = None  # (model, [(param, row0, row1)], flat gradient buffer)
        self._warned = False

    @property
    def basis(self) -> Optional[torch.Tensor]:
        """S, [n_params, m], orthonormal columns (a view of ``directions``); None before the
        first experience ends."""
        return None if self.directions is None else self.directions.T

    # ------------------------------------------------------------------------- properties

    @property
    def n_directions(self) -> int:
        return 0 if self.directions is None else int(self.directions.shape[0])

    @property
    def memory_bytes(self) -> int:
        """Bytes held by S (n_params * m * element size)."""
        d = self.directions
        return 0 if d is None else d.numel() * d.element_size()

    # ------------------------------------------------------------------------------ hooks

    def before_training_exp(self, strategy, **kwargs):
        params = self._check_layout(strategy.model)
        rows, slices = 0, []
        for p in params.values():
            slices.append((p, rows, rows + p.numel()))
            rows += p.numel()
        first = next(iter(params.values()))
        flat = torch.empty(rows, device=first.device, dtype=first.dtype)
        self._cache = (strategy.model, slices, flat)
        if self.directions is not None:
            self.directions = self.directions.to(device=first.device,
                                                 dtype=first.dtype).contiguous()
        self._warn_optimizer(getattr(strategy, "optimizer", None))

    def before_update(self, strategy, **kwargs):
        if not self.n_directions:
            return  # first task: plain SGD
        cache = self._cache
        if cache is None or cache[0] is not strategy.model:
            self.before_training_exp(strategy)
            cache = self._cache
        self.project_grads_(cache[1], cache[2])

    def after_training_exp(self, strategy, **kwargs):
        model = strategy.model
        params = self._check_layout(model)
        task = int(strategy.experience.task_labels[0]) if hasattr(strategy.experience,
                                                                  "task_labels") else 0
        first = next(iter(params.values()))
        if self.directions is not None:  # restored states live on the CPU
            self.directions = self.directions.to(device=first.device, dtype=first.dtype)
        new = self.new_directions(model, strategy.experience.dataset, params, task)
        m_new = self.n_directions + new.shape[0]
        if self.max_directions is not None and m_new > self.max_directions:
            n = sum(p.numel() for p in params.values())
            raise ValueError(
                f"OGD would hold {m_new} directions after this experience ({new.shape[0]} new), "
                f"more than max_directions={self.max_directions}. S takes n_params * m * 4 bytes "
                f"in float32 ({n} * {m_new} * 4 = {n * m_new * 4 / 2**20:.1f} MiB). Raise "
                "max_directions (None = unbounded) or lower memory_per_task; OGD has no rule for "
                "dropping stored directions, so none is dropped silently.")
        if not self.layout:
            self.layout = [(name, tuple(p.shape)) for name, p in params.items()]
        block = new.to(device=first.device, dtype=first.dtype)
        self.directions = block.contiguous() if self.directions is None else torch.cat(
            [self.directions, block], dim=0)
        self.directions_per_exp.append(int(new.shape[0]))
        self._cache = None

    # ------------------------------------------------------------------------- projection

    @torch.no_grad()
    def project_grads_(self, slices, flat: Optional[torch.Tensor] = None) -> None:
        """g <- g - S (S^T g) on the ``.grad`` of the cached shared parameters.

        The gradients are gathered into one flat vector (``flat``, reused across steps) and
        projected off S block of rows of S^T by block, each block's two products back to back
        while it is in cache (on a CPU). Each block sees the gradient already projected off the
        blocks before it; with orthonormal directions that is the same projection (the blocks
        are mutually orthogonal), like modified Gram-Schmidt against classical."""
        if all(p.grad is None for p, _, _ in slices):
            return  # no gradient at all: nothing to project
        d = self.directions
        n = slices[-1][2]
        if flat is None or flat.numel() != n:
            flat = torch.empty(n, device=d.device, dtype=d.dtype)
        for p, r0, r1 in slices:
            if p.grad is None:
                flat[r0:r1].zero_()
            else:
                flat[r0:r1].view_as(p).copy_(p.grad)
        rows = d.shape[0] if d.is_cuda else max(1, STEP_BLOCK_BYTES // (n * d.element_size()))
        for j0 in range(0, d.shape[0], rows):
            block = d[j0:j0 + rows]
            flat.addmv_(block.T, block @ flat, alpha=-1)
        for p, r0, r1 in slices:
            if p.grad is None:
                p.grad = flat[r0:r1].view_as(p).clone()
            else:
                p.grad.copy_(flat[r0:r1].view_as(p))

    @torch.no_grad()
    def project(self, g: torch.Tensor) -> torch.Tensor:
        """The projection of a flat vector g [n_params] (the shared parameters in ``layout``
        order, concatenated): g - S (S^T g); g itself when S is empty."""
        if not self.n_directions:
            return g.clone()
        d = self.directions.to(g.device, g.dtype)
        return g - d.T @ (d @ g)

    # -------------------------------------------------------------------- memory vectors

    def output_gradients(self, model: torch.nn.Module, params: Dict[str, torch.Tensor],
                         x: torch.Tensor, y: torch.Tensor, task: int = 0) -> torch.Tensor:
        """The variant's output gradients of a batch, flattened: [k, n_params] float64.

        ``"gtl"``: row i = d f_{y_i}(x_i) / d w; ``"ave"``: d mean_j f_j(x_i) / d w; ``"all"``:
        rows i*c .. i*c + c-1 = d f_j(x_i) / d w for j = 0 .. c-1 (sample-major, the order of the
        paper's loops). Per-sample gradients through ``torch.func`` (the model in eval mode).
        """
        names = list(params)

        def flat(grads):
            return torch.cat([grads[n].reshape(len(x), -1) for n in names], dim=1).double()

        y = y.long()
        if self.variant == "gtl":
            return flat(per_sample_gradients(model, params, x, y, _gtl, task_label=task))
        if self.variant == "ave":
            return flat(per_sample_gradients(model, params, x, y, _ave, task_label=task))
        with torch.no_grad():
            n_out = (model(x[:1], task) if isinstance(model, MultiTaskModule)
                     else model(x[:1])).shape[1]
        per_class = [flat(per_sample_gradients(model, params, x, y, _logit(c), task_label=task))
                     for c in range(n_out)]  # a loop over classes, not samples
        return torch.stack(per_class, dim=1).reshape(len(x) * n_out, -1)

    def new_directions(self, model: torch.nn.Module, dataset, params: Dict[str, torch.Tensor],
                       task: int = 0) -> torch.Tensor:
        """Orthonormal new directions [k, n_params] (float64, orthogonal to S) from a seeded
        sample of ``memory_per_task`` items of ``dataset`` (yielding (x, y[, ..., task]))."""
        if hasattr(dataset, "eval"):
            dataset = dataset.eval()  # no random augmentation in the stored gradients
        n_total = len(dataset)
        if n_total == 0:
            raise ValueError("OGDPlugin: the experience's dataset is empty; no gradient can be "
                             "stored")
        k = min(self.memory_per_task, n_total)
        idx = sorted(torch.randperm(n_total, generator=self.generator)[:k].tolist())
        self.memory_indices.append(idx)
        subset = dataset.subset(idx) if hasattr(dataset, "subset") else \
            torch.utils.data.Subset(dataset, idx)
        device = next(iter(params.values())).device
        multitask = isinstance(model, MultiTaskModule)
        batch = self.grad_batch_size
        if self.variant == "all":
            with torch.no_grad():
                x0 = subset[0][0].unsqueeze(0).to(device)
                was = model.training
                model.eval()
                out = model(x0, task) if multitask else model(x0)
                model.train(was)
            batch = max(1, batch // out.shape[1])
        n = sum(p.numel() for p in params.values())
        per_sample = 1 if self.variant != "all" else out.shape[1]
        gs = _Orthonormaliser(self.basis, n, k * per_sample, self.drop_tol, device)
        was_training = model.training
        model.eval()  # per-sample gradients need running statistics, and no dropout
        try:
            for x, y, t in iterate_batches(subset, batch, device):
                groups = torch.unique(t).tolist() if multitask else [0]
                for tk in groups:
                    sel = t == tk
                    xs, ys = (x[sel], y[sel]) if multitask else (x, y)
                    gs.add(self.output_gradients(model, params, xs, ys, int(tk)))
        finally:
            model.train(was_training)
        return gs.result()

    # ----------------------------------------------------------------------------- checks

    def _check_layout(self, model) -> Dict[str, torch.nn.Parameter]:
        params = shared_parameters(model)
        if not params:
            raise ValueError(f"OGDPlugin: {type(model).__name__} has no shared trainable "
                             "parameters (all are frozen or task-specific heads); OGD has "
                             "nothing to project")
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) > 1:
            raise ValueError(f"OGDPlugin needs the shared parameters in one dtype; found "
                             f"{sorted(str(d) for d in dtypes)}")
        if self.layout:
            found = [(n, tuple(p.shape)) for n, p in params.items()]
            if found != self.layout:
                diff = [f"{a} vs stored {b}" for a, b in zip(found, self.layout) if a != b]
                raise ValueError(
                    "OGDPlugin: the shared parameters changed since the stored directions were "
                    f"computed ({len(found)} tensors now, {len(self.layout)} stored; first "
                    f"differences: {diff[:3]}). OGD needs a fixed parameter layout: use a "
                    "fixed-size head (MaskedHead, MultiHeadClassifier), not a growing one.")
        return params

    def _warn_optimizer(self, optimizer) -> None:
        if optimizer is None or self._warned:
            return
        issues = []
        if not isinstance(optimizer, torch.optim.SGD):
            issues.append(type(optimizer).__name__)
        else:
            for g in optimizer.param_groups:
                for key in ("momentum", "weight_decay"):
                    if g.get(key, 0):
                        issues.append(f"{key}={g[key]}")
                if g.get("nesterov"):
                    issues.append("nesterov=True")
        if issues:
            self._warned = True
            warnings.warn(f"OGD projects the gradient; the paper steps with plain SGD (no "
                          f"momentum, no weight decay). With {', '.join(sorted(set(issues)))} "
                          "the optimizer's update is not the projected gradient, so old tasks' "
                          "outputs are no longer protected to first order.", stacklevel=2)

    # ------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {**owned_by(self), "method": self.METHOD_NAME, "variant": self.variant,
                "memory_per_task": self.memory_per_task, "max_directions": self.max_directions,
                "drop_tol": self.drop_tol, "seed": self.seed,
                "generator": self.generator.get_state(),
                "basis": None if self.directions is None else
                self.directions.detach().T.cpu().contiguous(),  # S, [n_params, m]
                "layout": [(n, list(s)) for n, s in self.layout],
                "directions_per_exp": list(self.directions_per_exp),
                "memory_indices": [list(i) for i in self.memory_indices]}

    def load_state_dict(self, state: dict) -> None:
        check_owner(self, state)
        for key in ("method", "variant", "memory_per_task", "max_directions", "drop_tol", "seed"):
            mine = self.METHOD_NAME if key == "method" else getattr(self, key)
            if state.get(key) != mine:
                raise ValueError(f"saved OGDPlugin state has {key}={state.get(key)!r}, this "
                                 f"plugin {mine!r}")
        self.generator.set_state(state["generator"])
        self.directions = None if state["basis"] is None else state["basis"].T.contiguous()
        self.layout = [(n, tuple(s)) for n, s in state["layout"]]
        self.directions_per_exp = list(state["directions_per_exp"])
        self.memory_indices = [list(i) for i in state["memory_indices"]]
        self._cache = None  # S moves to the model's device at the next experience
