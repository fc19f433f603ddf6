"""Exemplar relation graph distillation (ERG): keep the angles between old-class exemplars.

Name: ``erg_kd``. Scenarios: task-IL, domain-IL, class-IL. Task labels: not needed.
Paper: S. Dong, X. Hong, X. Tao, X. Chang, X. Wei, Y. Gong, "Few-Shot Class-Incremental Learning
via Relation Knowledge Distillation", AAAI 2021 (ERDIL: the exemplar relation graph and the
exemplar relation loss). No official code is published. What could and could not be read of the
paper, and every choice below: docs/methods/erg_kd.md.

The plugin keeps the graph itself: its nodes are exemplars of the classes trained so far, chosen
at the end of each experience from that experience's samples (``exemplars_per_class`` per class,
by degree in the just-trained model's feature space, ``selection``), and the graph grows by the
new classes' exemplars after every experience (the paper's graph update). The teacher is the
frozen model of the previous experience (``core.feature_distill``). With f(x) the features of
``layers`` (flattened; default the backbone's output) of the student (s) and the teacher (t) on
the graph's nodes v_1..v_N, and the angle at node j of the triplet (i, j, k),

    c_ijk(f) = < (f_i - f_j) / ||f_i - f_j||, (f_k - f_j) / ||f_k - f_j|| >
    L_ER = mean over the graph's triplets (i, j, k) of Huber(c_ijk(s) - c_ijk(t))
    loss = CE + weight * sum_layers L_ER

(``core.distill_losses.erg_triplet_mask`` and ``erg_angle_loss``; triplets: i, j, k distinct,
i < k; ``triplets="cross_class"``: three different labels.) Degree selection: within a class,
with A_ab = max(0, cos(f_a, f_b)) for a != b (f: the teacher's features of the first of
``layers``), the samples of largest degree sum_b A_ab.

Hooks: ``before_training_exp`` (teacher, the student's tap; the teacher's node features, fixed
for the experience), ``before_backward`` (one student forward pass over the nodes; adds the
term from the second experience on), ``after_training_exp`` (teacher; new nodes),
``after_training``.

Hyper-parameters: ``weight`` = 50.0 (RKD's angle weight for image classification, Park et al.
2019 via RepDistiller: ERDIL's loss weight could not be read here), ``exemplars_per_class`` = 5
(assumed: FSCIL sessions bring 5 shots per class; ERDIL's count was not read), ``selection`` =
"degree" | "random" (the paper's ablation compares both), ``triplets`` = "all" | "cross_class",
``layers`` = "backbone", ``seed`` = None (generator of the random selection; None draws it from
torch's global RNG; saved).

Deviations and choices (see the docs):
- few-shot sessions are not modelled: every experience's classes get exemplars alike;
- the paper's metric-learning term and the new-class exemplars in the graph while their session
  trains (ERL++) are not implemented; compose with ER for replay (``plus: [er]``);
- the Huber distance between cosines is RKD's angle loss (ERDIL's distance could not be read);
- cost: one extra forward/backward over the N nodes per step and O(N^3) cosines.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from avalanche.models.utils import avalanche_forward
from torch import Tensor

from cl_plugins.core.buffer import resolve_seed
from cl_plugins.core.checks import check_choice, check_int
from cl_plugins.core.distill_losses import erg_angle_loss, erg_triplet_mask
from cl_plugins.core.feature_distill import FeatureDistillPlugin, LayerTaps
from cl_plugins.core.per_sample import eval_view
from cl_plugins.core.seeding import seeded_generator

SELECTIONS = ("degree", "random")
TRIPLETS = ("all", "cross_class")


def degree_order(features: Tensor, chunk: int = 1024) -> Tensor:
    """Indices of the rows of ``features`` [n, d] by decreasing degree in the graph whose edge
    weights are the non-negative cosine similarities between distinct rows (ties: lower index).
    Rows are taken ``chunk`` at a time (a class of MNIST: 6,000 x 6,000 similarities)."""
    f = F.normalize(features.detach().flatten(1).double(), dim=1)
    deg = torch.cat([(f[i:i + chunk] @ f.t()).clamp_min(0).sum(1)
                     for i in range(0, f.shape[0], chunk)])
    deg -= (f * f).sum(1)  # the diagonal (1, or 0 for an all-zero row) is no edge
    return torch.sort(-deg, stable=True).indices


class ERGKDPlugin(FeatureDistillPlugin, supports_distributed=True):
    METHOD_NAME = "erg_kd"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"weight": {"distribution": "log_uniform_values", "min": 1.0, "max": 200.0},
                   "exemplars_per_class": {"values": [2, 5, 10]}}
    PAPER = ("Few-Shot Class-Incremental Learning via Relation Knowledge Distillation "
             "(Dong et al., AAAI 2021)")
    SUMMARY = ("keeps the old model's triplet angles over a graph of exemplars of the old "
               "classes (chosen by degree, grown every experience); Huber loss")
    SETTINGS = ("weight", "layers", "inputs", "exemplars_per_class", "selection", "triplets")

    def __init__(self, weight: float = 50.0, exemplars_per_class: int = 5,
                 selection: str = "degree", triplets: str = "all",
                 layers: Union[str, Sequence[str]] = "backbone", seed: Optional[int] = None):
        super().__init__(weight, layers, "current")  # the rows are the graph's nodes
        self.exemplars_per_class = check_int("exemplars_per_class", exemplars_per_class, 1)
        self.selection = check_choice("selection", selection, SELECTIONS)
        self.triplets = check_choice("triplets", triplets, TRIPLETS)
        self.generator = seeded_generator(resolve_seed(seed))
        self.nodes: Optional[Dict[str, Tensor]] = None  # x, y, t of the graph's nodes (CPU)
        self._mask: Optional[Tensor] = None
        self._teacher_nodes: Optional[Dict[str, Tensor]] = None

    # ------------------------------------------------------------------ the graph
    def prepare(self, strategy) -> None:
        self._mask = self._teacher_nodes = None
        if self.nodes is None:
            return
        x, t = (self.nodes[k].to(strategy.device) for k in ("x", "t"))
        self._mask = erg_triplet_mask(self.nodes["y"].to(strategy.device),
                                      self.triplets == "cross_class")
        self._teacher_nodes = self.teacher_features(x, t)  # fixed while this experience trains

    def select(self, features: Tensor) -> Tensor:
        """Indices of the exemplars kept among one class's samples (features [n, d])."""
        k = min(self.exemplars_per_class, features.shape[0])
        if self.selection == "degree":
            return degree_order(features)[:k]
        return torch.randperm(features.shape[0], generator=self.generator)[:k]

    def add_nodes(self, strategy) -> None:
        """Exemplars of every class of the experience just trained, by the teacher's features."""
        ds = eval_view(strategy.experience.dataset)
        loader = torch.utils.data.DataLoader(ds, batch_size=strategy.eval_mb_size or 256,
                                             shuffle=False, generator=torch.Generator())
        taps = LayerTaps(self.teacher, self.layers[:1], self.who)
        taps.armed = True
        xs, ys, ts, fs = [], [], [], []
        try:
            with torch.no_grad():
                for x, y, t in ((b[0], b[1], b[2]) for b in loader):
                    avalanche_forward(self.teacher, x.to(strategy.device), t.to(strategy.device))
                    fs.append(taps.take()[self.layers[0]].flatten(1).cpu())
                    xs.append(x), ys.append(torch.as_tensor(y)), ts.append(torch.as_tensor(t))
        finally:
            taps.remove()
        x, y, t, f = torch.cat(xs), torch.cat(ys).long(), torch.cat(ts).long(), torch.cat(fs)
        picks = []
        for c in torch.unique(y).tolist():
            idx = torch.nonzero(y == c).flatten()
            picks.append(idx[self.select(f[idx])])
        pick = torch.cat(picks)
        new = {"x": x[pick].float(), "y": y[pick], "t": t[pick]}
        self.nodes = new if self.nodes is None else \
            {k: torch.cat([self.nodes[k], new[k]]) for k in new}

    # ------------------------------------------------------------------ hooks
    def before_forward(self, strategy, **kwargs):
        pass  # the training forward's features are not used: the term runs on the nodes

    def before_backward(self, strategy, **kwargs):
        if self.teacher is None or self._mask is None or self.weight == 0.0:
            return
        if not bool(self._mask.any()):
            return  # fewer than 3 nodes, or no triplet of three classes yet
        x, t = (self.nodes[k].to(strategy.device) for k in ("x", "t"))
        self._taps.armed = True
        try:
            avalanche_forward(strategy.model, x, t)
        finally:
            self._taps.armed = False
        student = self._taps.take()
        strategy.loss += self.weight * self.distill_loss(student, self._teacher_nodes,
                                                         self.nodes["y"], self.nodes["t"])

    def distill_loss(self, student: Dict[str, Tensor], teacher: Dict[str, Tensor], y: Tensor,
                     t: Tensor) -> Tensor:
        mask = erg_triplet_mask(y, self.triplets == "cross_class") if self._mask is None \
            else self._mask
        return sum(erg_angle_loss(student[n], teacher[n], mask) for n in self.layers)

    def after_training_exp(self, strategy, **kwargs):
        super().after_training_exp(strategy, **kwargs)  # the teacher: the model just trained
        self.add_nodes(strategy)
        self._mask = self._teacher_nodes = None

    # ------------------------------------------------------------------ state
    def extra_state(self) -> Dict:
        nodes = None if self.nodes is None else {k: v.clone() for k, v in self.nodes.items()}
        return {"nodes": nodes, "generator": self.generator.get_state()}

    def load_extra_state(self, state: Dict) -> None:
        nodes = state.get("nodes")
        self.nodes = None if nodes is None else {k: v.clone() for k, v in nodes.items()}
        self.generator.set_state(state["generator"].clone())
        self._mask = self._teacher_nodes = None
