"""cl_plugins.core.episodic: flat gradients over the touched parameters and the write-back."""

from __future__ import annotations

import torch

from cl_plugins.core.episodic import flat_gradients, single_task_label, write_grads


def test_flat_gradient_helpers():
    """cl_plugins.core.episodic: flattening over the touched parameters and the write-back."""
    a, b, c = (torch.nn.Parameter(torch.zeros(*shape)) for shape in ((2, 3), (4,), (1,)))
    a.grad = torch.ones(2, 3)
    ga, gb = torch.full((2, 3), 2.0), torch.arange(4.0)
    ps, g, G = flat_gradients([a, b, c], [(ga, None, None), (None, gb, None)])
    assert [id(p) for p in ps] == [id(a), id(b)]  # c: touched by nothing
    assert torch.equal(g, torch.cat([torch.ones(6), torch.zeros(4)]))
    assert torch.equal(G, torch.stack([torch.cat([ga.flatten(), torch.zeros(4)]),
                                       torch.cat([torch.zeros(6), gb])]))
    vec = torch.arange(10.0)
    write_grads(ps, vec)
    assert torch.equal(a.grad, vec[:6].view(2, 3)) and torch.equal(b.grad, vec[6:])
    assert c.grad is None
    assert single_task_label(torch.tensor([2, 2])) == 2
    mixed = torch.tensor([0, 1])
    assert single_task_label(mixed) is mixed
