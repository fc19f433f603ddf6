"""core.vae (van de Ven's Split MNIST VAE) and core.generator (the generator protocol): the loss
against a hand computation, shapes and layer sizes, the weighted training step, x_range, and
the protocol's check."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from cl_plugins.core.generator import ReplayGenerator, check_generator
from cl_plugins.core.vae import VAE, parse_x_range, vae_loss


def test_vae_loss_against_a_hand_computation():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 2, 2)
    x_hat = torch.rand(3, 1, 2, 2) * 0.9 + 0.05
    mu, logvar = torch.randn(3, 2), torch.randn(3, 2)
    want = 0.0
    for n in range(3):
        px, pr = x[n].flatten().tolist(), x_hat[n].flatten().tolist()
        recon = sum(-(a * math.log(b) + (1 - a) * math.log(1 - b)) for a, b in zip(px, pr)) / 4
        kl = sum(-0.5 * (1 + float(lv) - float(m) ** 2 - math.exp(float(lv)))
                 for m, lv in zip(mu[n], logvar[n])) / 4  # divided by the pixels, as his code
        want += (recon + kl) / 3
    assert vae_loss(x, x_hat, mu, logvar).item() == pytest.approx(want, rel=1e-5)


def test_vae_layers_are_his_split_mnist_sizes_and_samples_have_the_input_shape():
    vae = VAE((1, 28, 28))
    shapes = [tuple(m.weight.shape) for m in vae.modules() if isinstance(m, nn.Linear)]
    # encoder 784-400-400, mu and logvar 400->100, decoder 100-400-400-784
    assert shapes == [(400, 784), (400, 400), (100, 400), (100, 400), (400, 100), (400, 400),
                      (784, 400)]
    # his fc_layer_split: the mean layer has a bias, the log-variance layer none
    assert [m.bias is None for m in vae.modules() if isinstance(m, nn.Linear)] == [
        False, False, False, True, False, False, False]
    assert isinstance(vae.optimizer, torch.optim.Adam)
    assert vae.optimizer.defaults["lr"] == 0.001 and vae.optimizer.defaults["betas"] == (0.9,
                                                                                         0.999)
    rng = torch.Generator().manual_seed(0)
    s = vae.sample(5, rng)
    assert s.shape == (5, 1, 28, 28) and not s.requires_grad
    assert float(s.min()) >= 0.0 and float(s.max()) <= 1.0
    # the same generator state gives the same samples; the global RNG is not used
    torch.manual_seed(1)
    before = torch.random.get_rng_state()
    again = vae.sample(5, torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(s, again)
    assert isinstance(vae, ReplayGenerator) and check_generator("generator", vae) is vae


def test_train_step_weights_current_and_replayed_losses():
    torch.manual_seed(0)
    vae = VAE((1, 4, 4), fc_layers=2, fc_units=8, z_dim=3, x_range=[0.0, 1.0])
    twin = copy.deepcopy(vae)
    x, xr = torch.rand(6, 1, 4, 4), torch.rand(5, 1, 4, 4)
    rng = torch.Generator().manual_seed(3)
    state = rng.get_state()
    with torch.no_grad():  # the same noise: the current batch's draw first, then the replayed
        cur, rep = vae.loss(x, rng).item(), vae.loss(xr, rng).item()
    rng.set_state(state)
    w0 = vae.decoder[-2].weight.detach().clone()
    assert vae.train_step(x, xr, current_weight=0.25, rng=rng) == pytest.approx(
        0.25 * cur + 0.75 * rep, rel=1e-6)
    assert not torch.equal(w0, vae.decoder[-2].weight)  # one Adam step was taken
    rng.set_state(state)  # without replayed inputs: the current loss alone, unweighted
    assert twin.train_step(x, None, current_weight=0.25, rng=rng) == pytest.approx(cur, rel=1e-6)


def test_train_steps_lower_the_loss():
    torch.manual_seed(0)
    vae = VAE((1, 4, 4), fc_layers=2, fc_units=32, z_dim=4, lr=0.01)
    protos = torch.stack([torch.eye(4), torch.eye(4).flip(1)]).unsqueeze(1)  # two images
    x = protos[torch.arange(64) % 2]
    rng = torch.Generator().manual_seed(0)
    first = vae.train_step(x, rng=rng)
    for _ in range(60):
        last = vae.train_step(x, rng=rng)
    assert last < 0.6 * first


def test_x_range_maps_inputs_to_unit_and_samples_back():
    vae = VAE((2, 3, 3), fc_layers=2, fc_units=8, z_dim=2, x_range=[[-1.0, 0.0], [1.0, 2.0]])
    x = torch.stack([torch.full((3, 3), -1.0), torch.full((3, 3), 2.0)]).unsqueeze(0)
    u = vae.to_unit(x)
    assert torch.equal(u[0, 0], torch.zeros(3, 3)) and torch.equal(u[0, 1], torch.ones(3, 3))
    s = vae.sample(50, torch.Generator().manual_seed(0))
    assert float(s[:, 0].min()) >= -1 and float(s[:, 0].max()) <= 1
    assert float(s[:, 1].min()) >= 0 and float(s[:, 1].max()) <= 2
    with pytest.raises(ValueError, match="outside x_range"):
        VAE((1, 2, 2), 2, 4, 2, x_range=[0, 1]).to_unit(torch.full((1, 1, 2, 2), -0.5))
    auto = VAE((2, 1, 2), 2, 4, 2)  # x_range=None: each channel's running min and max
    auto.update_range(torch.tensor([[[[0.5, 2.0]], [[-1.0, 0.0]]]]))
    auto.update_range(torch.tensor([[[[-0.5, 1.0]], [[-2.0, -1.0]]]]))
    assert auto.lo.flatten().tolist() == [-0.5, -2.0] and auto.hi.flatten().tolist() == [2.0, 0.0]
    assert "range_seen" in auto.state_dict()
    lo, hi = parse_x_range([0.0, 1.0], 3)
    assert lo.tolist() == [0.0] * 3 and hi.tolist() == [1.0] * 3


@pytest.mark.parametrize("bad", [[1.0, 0.0], "ab", [0.0], [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]],
                                 [0.0, math.inf]])
def test_bad_x_range(bad):
    with pytest.raises(ValueError, match="x_range must be"):
        parse_x_range(bad, 2)


@pytest.mark.parametrize("kwargs, match", [({"fc_layers": 1}, "fc_layers"),
                                           ({"fc_units": 0}, "fc_units"),
                                           ({"z_dim": 0}, "z_dim"), ({"lr": 0.0}, "lr")])
def test_bad_vae_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VAE((1, 2, 2), **kwargs)


def test_check_generator_names_what_is_missing():
    class NoTrain(nn.Module):
        optimizer = None

        def sample(self, n, rng=None):
            return torch.zeros(n, 1)

    with pytest.raises(ValueError, match="generator must be None.*it lacks train_step"):
        check_generator("generator", NoTrain())
    with pytest.raises(ValueError, match="not an nn.Module"):
        check_generator("generator", object())
