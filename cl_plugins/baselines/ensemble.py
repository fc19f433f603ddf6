"""Ensemble: one network per task ("separate networks", van de Ven et al. 2022, Table 2).

Name: ``ensemble``. Scenarios: task-IL only (the task label chooses the network at test time).
Arguments: none.

Paper / protocol: the "separate networks" upper reference of van de Ven, Tuytelaars & Tolias,
"Three types of incremental learning", Nature Machine Intelligence 2022 (99.57 on Split MNIST
task-IL): each task trains its own copy of the architecture from a fresh initialisation, so there
is no interference and no transfer.

Hooks: ``before_train_dataset_adaptation`` refuses (``ValueError``) a training stream without task
labels (every experience with one label, or a label trained before: it would be naive fine-tuning
of one network), then (first experience only) wraps ``strategy.model`` in a
:class:`~cl_plugins.models.ensemble.TaskEnsemble`. Avalanche then runs the model adaptation, which
adds the new task's network, and refreshes the optimizer with its parameters. Old networks get no
gradient (they are not in the forward pass of the current task), so optimizers skip them.

Deviations: the total parameter budget grows linearly with the number of tasks, as in the paper's
baseline; nothing is shared, not even the first layers. ``strategy.model`` is replaced: keep a
reference to the strategy, not to the original model object.
"""

from __future__ import annotations

from avalanche.core import SupervisedPlugin

from cl_plugins.core.state import check_owner, owned_by
from cl_plugins.core.task_labels import require_task_labels
from cl_plugins.models.ensemble import TaskEnsemble


class EnsemblePlugin(SupervisedPlugin, supports_distributed=True):
    METHOD_NAME = "ensemble"
    SCENARIOS = ("task",)
    NEEDS_TASK_LABELS = True
    SWEEP: dict = {}
    PAPER = "separate networks (van de Ven, Tuytelaars & Tolias, Nat. Mach. Intell. 2022)"
    SUMMARY = "one freshly initialised network per task; the task label picks it"

    def __init__(self):
        super().__init__()
        self.trained_tasks: list = []  # task labels trained on, one network each

    def before_train_dataset_adaptation(self, strategy, **kwargs):
        require_task_labels(type(self).__name__, strategy.experience, self.trained_tasks)
        if not isinstance(strategy.model, TaskEnsemble):
            strategy.model = TaskEnsemble(strategy.model)

    def after_training_exp(self, strategy, **kwargs):
        self.trained_tasks += [int(t) for t in strategy.experience.task_labels]

    def before_eval_dataset_adaptation(self, strategy, **kwargs):
        # Evaluating before any training still needs the wrapper to route task labels.
        if not isinstance(strategy.model, TaskEnsemble):
            strategy.model = TaskEnsemble(strategy.model)

    def state_dict(self):  # every network lives in the model's own state_dict
        return {**owned_by(self), "trained_tasks": list(self.trained_tasks)}

    def load_state_dict(self, state):
        check_owner(self, state)
        self.trained_tasks = [int(t) for t in state["trained_tasks"]]
