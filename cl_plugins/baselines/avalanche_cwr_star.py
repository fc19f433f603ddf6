"""Avalanche 0.6's CWR* plugin, built without a model (the runner builds plugins first).

Registered as ``avalanche_cwr_star`` (a reference method, run beside our ``cwr``), domain- and
class-IL.

Why a wrapper: ``CWRStarPlugin.__init__(model, cwr_layer_name=None,
freeze_remaining_model=True)`` needs the model, and stores its state on it (``saved_weights``,
``past_j``, ``cur_j``); the runner constructs plugins from their hyper-parameters before it
builds the model. This class takes the two hyper-parameters and runs Avalanche's own
``__init__`` on ``strategy.model`` at the first ``before_training_exp`` (again if the strategy's
model object changes). Everything else is Avalanche's code, unchanged: the head found as the
last ``nn.Linear`` of the model (``head.linear`` of a ``MaskedHead``) unless ``cwr_layer_name``
names it, the whole model frozen but that layer from the second experience on, the head's bias
trained and never reset or consolidated, the arithmetic in float32 (numpy). It keeps no
``state_dict``, so runs with it are not checkpointed (their JSON says why).
"""

from __future__ import annotations

from typing import Optional

from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import CWRStarPlugin


class AvalancheCWRStarPlugin(CWRStarPlugin):
    """Avalanche's ``CWRStarPlugin`` bound to ``strategy.model`` at the first training hook."""

    def __init__(self, cwr_layer_name: Optional[str] = None, freeze_remaining_model: bool = True):
        SupervisedPlugin.__init__(self)
        self.cwr_layer_name = cwr_layer_name
        self.freeze_remaining_model = freeze_remaining_model
        self.model = None
        self.cur_class = []

    def before_training_exp(self, strategy, **kwargs):
        if self.model is not strategy.model:
            CWRStarPlugin.__init__(self, strategy.model, self.cwr_layer_name,
                                   self.freeze_remaining_model)
        super().before_training_exp(strategy, **kwargs)
