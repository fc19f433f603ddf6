"""Exemplar sets chosen by herding, class means of exemplars and nearest-mean scores (iCaRL).

Rebuffi et al., CVPR 2017: Algorithm 4 (herding: the exemplars whose running mean stays closest
to the class mean), Algorithm 5 (reduction: keep a prefix of the herding order) and Algorithm 1
(nearest mean of exemplars, NME). Features phi are L2-normalised; the math is on plain tensors,
testable without a strategy. ``dataset_features`` and ``backbone_features`` compute the backbone
features of a dataset or of a tensor of exemplars, in eval batches; ``memory_dataset`` turns a
``ReplayBuffer``'s contents into an Avalanche dataset (to train on with the experience's data).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

UNSCORED = -1e4  # NME score of classes without exemplars (as MaskedHead's masked logits)


def herding_order(features: Tensor, m: int, normalize: bool = True) -> Tensor:
    """The first min(m, n) indices of Algorithm 4's herding order over ``features`` [n, d],

        p_k = argmin_{x not chosen} || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||,

    as argmin ||phi||^2 - 2 <k mu - S_{k-1}, phi> (the same argmin). ``normalize``: L2-normalise
    the rows first (iCaRL's phi). Float64 on the features' device; ties to the lowest index."""
    f = features.detach().to(torch.float64).flatten(1)
    if normalize:
        f = F.normalize(f, dim=1)
    n, m = f.shape[0], min(int(m), f.shape[0])
    mu, sq = f.mean(0), (f * f).sum(1)
    running = torch.zeros_like(mu)  # S_{k-1}: sum of the chosen features
    taken = torch.zeros(n, dtype=torch.bool, device=f.device)
    order = torch.empty(m, dtype=torch.long, device=f.device)
    for k in range(1, m + 1):
        # k^2 || mu - (S + phi) / k ||^2 = ||k mu - S||^2 - 2 <k mu - S, phi> + ||phi||^2
        score = sq - 2.0 * (f @ (k * mu - running))
        i = torch.argmin(score.masked_fill(taken, float("inf")))
        order[k - 1] = i
        taken[i] = True
        running += f[i]
    return order


def herded_memory(buffer, x: Tensor, y: Tensor, t: Tensor, f: Tensor, classes: Sequence[int],
                  m: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(x, y, t) of the new memory: for each class of ``classes`` in order, the first ``m`` of
    its herding order over the new samples ``x`` (features ``f``) if it has any (Algorithm 4),
    else the first ``m`` rows of that class in the ``ReplayBuffer`` ``buffer``, whose rows are in
    herding order (Algorithm 5)."""
    stored = buffer.get(torch.arange(len(buffer)), "cpu") if len(buffer) else None
    new = set(int(c) for c in torch.unique(y).tolist())
    parts = []
    for c in classes:
        if c in new:
            idx = torch.nonzero(y == c).flatten()
            pick = idx[herding_order(f[idx.to(f.device)], m).cpu()]
            parts.append((x[pick], y[pick], t[pick]))
        else:
            rows = torch.nonzero(stored.y == c).flatten()[:m]
            t_old = stored.t[rows] if stored.t is not None else torch.zeros_like(rows)
            parts.append((stored.x[rows], stored.y[rows], t_old))
    x_mem, y_mem, t_mem = (torch.cat(p) for p in zip(*parts))
    return x_mem, y_mem, t_mem


def class_means(f: Tensor, y: Tensor, classes: Sequence[int],
                f_flip: Optional[Tensor] = None) -> Tensor:
    """[len(classes), d] float32 (CPU) mu_y of Algorithm 1: the normalised mean of the normalised
    features ``f`` of class y's exemplars, averaged with that of their flips ``f_flip`` if given."""
    f = F.normalize(f.double(), dim=1)
    f2 = None if f_flip is None else F.normalize(f_flip.double(), dim=1)
    y, means = y.to(f.device), []
    for c in classes:
        mu = f[y == c].mean(0)
        if f2 is not None:
            mu = (mu + f2[y == c].mean(0)) / 2
        means.append(F.normalize(mu, dim=0))
    return torch.stack(means).float().cpu()


def nme_scores(features: Tensor, means: Tensor, classes: Sequence[int], n_outputs: int) -> Tensor:
    """[N, n_outputs] scores: -|| normalise(features) - mean_c || in column c of ``classes``,
    ``UNSCORED`` elsewhere. ``means`` [len(classes), d] are already normalised."""
    f = F.normalize(features.flatten(1).to(means.dtype), dim=1)
    dist = torch.cdist(f, means, compute_mode="donot_use_mm_for_euclid_dist")
    out = torch.full((f.shape[0], n_outputs), UNSCORED, dtype=dist.dtype, device=dist.device)
    out[:, torch.as_tensor(list(classes), dtype=torch.long, device=out.device)] = -dist
    return out


@torch.no_grad()
def dataset_features(model: nn.Module, dataset, device, batch_size: int
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x, y, t, phi) of every sample of an Avalanche ``dataset`` in its order, phi =
    ``model.backbone(x)`` flattened (not normalised), computed on ``device`` in batches."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    xs, ys, ts, fs = zip(*[(b[0], torch.as_tensor(b[1]), torch.as_tensor(b[2]),
                            model.backbone(b[0].to(device)).flatten(1)) for b in loader])
    return torch.cat(xs), torch.cat(ys).long(), torch.cat(ts).long(), torch.cat(fs)


@torch.no_grad()
def backbone_features(model: nn.Module, x: torch.Tensor, device, batch_size: int,
                      flip: bool = False) -> torch.Tensor:
    """``model.backbone`` on ``x`` in batches of ``batch_size`` on ``device``, flattened to
    [N, d]; ``flip``: on the inputs mirrored along their last dimension (horizontal flip)."""
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size].to(device)
        if flip:
            xb = xb.flip(-1)
        out.append(model.backbone(xb).flatten(1))
    return torch.cat(out) if out else torch.empty(0)


def memory_dataset(buffer):
    """The contents of a ``ReplayBuffer`` (x as float inputs, task labels 0 if none stored) as
    an Avalanche task-aware classification dataset."""
    # Avalanche 0.6 exports no public builder of a task-aware dataset from tensors; this
    # private one is what its own replay storage policies use.
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    mem = buffer.get(torch.arange(len(buffer)), "cpu")
    t = mem.t if mem.t is not None else torch.zeros_like(mem.y)
    return _make_taskaware_tensor_classification_dataset(mem.x, mem.y, task_labels=t.tolist(),
                                                         targets=mem.y)
