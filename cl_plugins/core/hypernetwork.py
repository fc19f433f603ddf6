"""A chunked, task-conditioned hypernetwork and its output regulariser (von Oswald et al. 2020).

``ChunkedHypernet(n_outputs, chunk_size, task_emb_dim, chunk_emb_dim, hidden, activation)`` maps
a task embedding e (``task_emb_dim``) to a flat vector of ``n_outputs`` target weights. The
outputs are cut into ``n_chunks = ceil(n_outputs / chunk_size)`` chunks; chunk c is produced by
one small MLP from the concatenation [e, c_c] of the task embedding and a learned chunk embedding
c_c (``chunk_emb_dim``), all chunks in one batched call; the chunks are concatenated and the
surplus of the last chunk dropped:

    f_h(e, Theta_h) = [ MLP([e, c_1]), ..., MLP([e, c_{n_chunks}]) ][:n_outputs]

Theta_h = the chunk embeddings and the MLP's weights and biases (``theta()``); task embeddings
are kept by the caller. Initialisation (official code chrhenning/hypercl, mnist/train_utils.py,
as read): every weight matrix Xavier-uniform, every bias 0, chunk embeddings N(0, 1);
``init_(generator)`` draws them from a given CPU generator.

``output_regulariser(hnet, embeddings, targets, delta)``: the mean over earlier tasks j of
||target_j - f_h(e_j, Theta_h + delta)||^2 (a sum over all weights), Eq. 2 without its beta.
``delta`` (the lookahead Delta Theta_h, or None) is a constant; the gradient reaches Theta_h.

``adam_lookahead(optimizer, params)``: the step Adam would apply to ``params`` with their
current gradients, -lr m_hat / (sqrt(v_hat) + eps), without touching the optimizer's state
(weight decay included; AMSGrad refused).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "sigmoid": nn.Sigmoid, "linear": nn.Identity}


class ChunkedHypernet(nn.Module):
    def __init__(self, n_outputs: int, chunk_size: int, task_emb_dim: int, chunk_emb_dim: int,
                 hidden: Sequence[int], activation: str = "relu"):
        super().__init__()
        self.n_outputs, self.chunk_size = int(n_outputs), int(chunk_size)
        self.n_chunks = math.ceil(self.n_outputs / self.chunk_size)
        self.task_emb_dim = int(task_emb_dim)
        self.chunk_emb = nn.Parameter(torch.empty(self.n_chunks, chunk_emb_dim))
        layers, width = [], task_emb_dim + chunk_emb_dim
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        self.mlp = nn.Sequential(*layers, nn.Linear(width, self.chunk_size))

    @torch.no_grad()
    def init_(self, generator: torch.Generator) -> "ChunkedHypernet":
        for p in self.mlp.parameters():
            fresh = torch.empty(p.shape)
            if p.dim() > 1:
                nn.init.xavier_uniform_(fresh, generator=generator)
            else:
                fresh.zero_()
            p.copy_(fresh)
        self.chunk_emb.copy_(torch.randn(self.chunk_emb.shape, generator=generator))
        return self

    def theta(self) -> List[nn.Parameter]:
        return list(self.parameters())

    def forward(self, emb: Tensor) -> Tensor:
        """``emb``: [task_emb_dim] or [B, task_emb_dim] -> [n_outputs] or [B, n_outputs]."""
        single = emb.dim() == 1
        e = emb.reshape(-1, 1, self.task_emb_dim).expand(-1, self.n_chunks, -1)
        c = self.chunk_emb.unsqueeze(0).expand(e.shape[0], -1, -1)
        out = self.mlp(torch.cat([e, c], -1)).flatten(1)[:, :self.n_outputs]
        return out[0] if single else out


def output_regulariser(hnet: ChunkedHypernet, embeddings: Tensor, targets: Tensor,
                       delta: Optional[Dict[str, Tensor]] = None) -> Tensor:
    """(1 / n) sum_j ||targets[j] - f_h(embeddings[j], Theta_h + delta)||^2 (Eq. 2 / beta)."""
    params = dict(hnet.named_parameters())
    if delta is not None:
        params = {n: p + delta[n].detach() for n, p in params.items()}  # lookahead: a constant
    out = functional_call(hnet, params, (embeddings,))
    return (targets - out).pow(2).sum() / targets.shape[0]


@torch.no_grad()
def adam_lookahead(optimizer: torch.optim.Adam, params: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """{name: the step Adam would take now}; zeros where a parameter has no gradient."""
    out = {}
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, p in params.items():
        g = group_of[id(p)]
        if g.get("amsgrad"):
            raise ValueError("adam_lookahead does not support AMSGrad")
        if p.grad is None:
            out[name] = torch.zeros_like(p)
            continue
        (b1, b2), lr, eps = g["betas"], g["lr"], g["eps"]
        grad = p.grad + g["weight_decay"] * p if g["weight_decay"] else p.grad
        state = optimizer.state.get(p, {})
        step = float(state["step"]) + 1 if "step" in state else 1.0
        m = b1 * state["exp_avg"] + (1 - b1) * grad if "exp_avg" in state else (1 - b1) * grad
        v = b2 * state["exp_avg_sq"] + (1 - b2) * grad * grad if "exp_avg_sq" in state \
            else (1 - b2) * grad * grad
        denom = (v.sqrt() / math.sqrt(1 - b2 ** step)) + eps
        out[name] = -(lr / (1 - b1 ** step)) * m / denom
    return out
