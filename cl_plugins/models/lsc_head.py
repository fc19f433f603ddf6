"""PODNet's local-similarity classifier (LSC): K cosine proxies per class, and its NCA loss.

Douillard et al., "PODNet", ECCV 2020, Sec. 3.3; official code github.com/arthurdouillard/
incremental_learning.pytorch: ``inclearn/lib/network/classifiers.py`` ``CosineClassifier``
(``proxy_per_class``, ``merging="softmax"``, ``add_imprinted_classes``), ``postprocessors.py``
``FactorScalar`` (the learned scale), ``inclearn/lib/losses/base.py`` ``nca``.

For features x and proxies w_{c,k} (class c, k = 1..K), s_{c,k} = <x/||x||, w_{c,k}/||w_{c,k}||>:

    y_c = sum_k softmax_k(s_{c,.}) s_{c,k}        (the class similarity, a soft max over proxies)
    z_c = eta * y_c                                (``forward``: the logits; eta learned, init 1)
    NCA = mean_i [ log( exp(max_c z_c) + sum_{c != y_i} exp(z_c) ) - z_{y_i} ]      (``nca_loss``)

One fixed block of ``n_outputs * K`` proxies is allocated up front; like ``MaskedHead``
(``models/heads.py``) the head unmasks the classes of each training experience in
``adaptation`` (``seen``), and the logits of classes never trained are ``mask_value`` (-1e4:
exp underflows to exactly 0, the NCA and softmax span the seen classes only). ``frozen`` classes
(PODNet: the old ones, while a new task trains) get no gradient through the logits. ``imprint``
sets a new class's proxies from its samples' normalised features (k-means centres, as the code's
weight imprinting with ``multi_class_diff="kmeans"``), scaled to the mean norm of the seen
classes' proxies. Deviations: the code's similarity is -||x^ - w^||^2 = 2 s - 2 (the same up to an
affine map, i.e. a softmax over proxies at twice the temperature and eta doubled); its k-means
is scikit-learn's (10 random restarts), ours is Lloyd's from the herding order (deterministic).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from avalanche.models import DynamicModule
from torch import nn

from cl_plugins.core.checks import check_int, check_positive
from cl_plugins.core.exemplars import herding_order


def nca_loss(logits: torch.Tensor, y: torch.Tensor, margin=0.0) -> torch.Tensor:
    """The official code's NCA (``losses/base.py`` ``nca``, ``exclude_pos_denominator=True``) on
    logits z, the positive's logit first lowered by ``margin`` (in logit units: eta * delta):

        mean_i [ log( exp(max_c z_ic) + sum_{c != y_i} exp(z_ic) ) - z_{i,y_i} ]

    The positive is left out of the denominator, but its zeroed slot in the code's
    max-subtracted form keeps one exp(max) there. With ``margin = 0`` this is the code exactly:
    the code subtracts its margin from every column, where it cancels."""
    y = y.long().view(-1, 1)
    pos = logits.gather(1, y) - margin
    z = logits.scatter(1, y, pos)
    neg = torch.cat([z.max(1, keepdim=True).values, z.scatter(1, y, float("-inf"))], dim=1)
    return (torch.logsumexp(neg, dim=1) - pos.squeeze(1)).mean()


def kmeans(f: torch.Tensor, k: int, iters: int = 50) -> torch.Tensor:
    """[k, d] Lloyd centres of the rows of ``f`` [n, d], started from its first k herding picks
    (deterministic); with n < k the rows are repeated. An empty cluster keeps its centre."""
    if f.shape[0] <= k:
        return f[torch.arange(k) % f.shape[0]].clone()
    centres = f[herding_order(f, k, normalize=False).to(f.device)].clone()
    assign = None
    for _ in range(iters):
        new = torch.cdist(f, centres).argmin(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        for j in range(k):
            if bool((assign == j).any()):
                centres[j] = f[assign == j].mean(0)
    return centres


class LSCHead(DynamicModule):
    """Multi-proxy cosine head over ``n_outputs`` classes, ``proxies`` (K) per class."""

    def __init__(self, in_features: int, n_outputs: int, proxies: int = 10, scale: float = 1.0,
                 mask_value: float = -1e4):
        super().__init__()
        check_int("in_features", in_features, 1)
        self.n_outputs = check_int("n_outputs", n_outputs, 1)
        self.k = check_int("proxies", proxies, 1)
        self.mask_value = float(mask_value)
        self.proxies = nn.Parameter(torch.empty(n_outputs * proxies, in_features))
        nn.init.kaiming_normal_(self.proxies, nonlinearity="linear")  # the code's add_classes
        self.scale = nn.Parameter(torch.tensor(float(check_positive("scale", scale))))  # eta
        self.register_buffer("seen", torch.zeros(n_outputs, dtype=torch.bool))
        self.register_buffer("frozen", torch.zeros(n_outputs, dtype=torch.bool))

    def adaptation(self, experience):
        super().adaptation(experience)
        if not self.training:
            return  # evaluation never unmasks a class
        classes = torch.as_tensor(list(experience.classes_in_this_experience), dtype=torch.long)
        if int(classes.max()) >= self.n_outputs:
            raise ValueError(f"LSCHead has {self.n_outputs} outputs but the experience holds "
                             f"class {int(classes.max())}")
        self.seen[classes.to(self.seen.device)] = True

    def freeze(self, classes: Sequence[int]) -> None:
        """Only ``classes`` get no gradient through the logits (an empty list: none)."""
        self.frozen.zero_()
        if len(classes):
            self.frozen[torch.as_tensor(list(classes), device=self.frozen.device)] = True

    def class_similarities(self, x: torch.Tensor) -> torch.Tensor:
        """[N, n_outputs]: y_c (module docstring), unmasked and unscaled."""
        w = self.proxies
        if bool(self.frozen.any()):
            rows = self.frozen.repeat_interleave(self.k).unsqueeze(1)
            w = torch.where(rows, w.detach(), w)
        s = F.normalize(x.flatten(1), dim=1) @ F.normalize(w, dim=1).t()
        s = s.view(x.shape[0], self.n_outputs, self.k)
        return (F.softmax(s, dim=2) * s).sum(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.scale * self.class_similarities(x)
        return z.masked_fill(~self.seen.unsqueeze(0), self.mask_value)

    @torch.no_grad()
    def imprint(self, classes: Sequence[int], features: torch.Tensor, labels: torch.Tensor
                ) -> None:
        """Set the proxies of ``classes`` from ``features`` [n, d] of samples labelled
        ``labels``: normalised mean (K = 1) or k-means centres of the normalised features, times
        the mean norm of the other seen classes' proxies (1 when there are none)."""
        others = self.seen.clone()
        others[torch.as_tensor(list(classes), dtype=torch.long, device=others.device)] = False
        w = self.proxies.view(self.n_outputs, self.k, -1)
        norm = w[others].norm(dim=2).mean() if bool(others.any()) else torch.tensor(1.0)
        f = F.normalize(features.detach().flatten(1).to(w.dtype), dim=1)
        labels = labels.to(f.device)
        for c in classes:
            fc = f[labels == c]
            if fc.shape[0] == 0:
                raise ValueError(f"LSCHead.imprint: no sample of class {c}")
            centres = F.normalize(fc.mean(0), dim=0)[None] if self.k == 1 else kmeans(fc, self.k)
            w[c] = centres.to(w.device) * norm.to(w.device)
