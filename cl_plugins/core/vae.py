"""The default replay generator: a fully connected VAE as in van de Ven's Split MNIST code.

Source: GMvandeVen/continual-learning, 2019 version (``vae_models.py`` ``AutoEncoder``,
``linear_nets.py`` ``MLP``, ``main.py``; same settings in the 2022 ``models/vae.py``,
``params/param_values.py``). With his Split MNIST defaults (``--fc-layers=3``,
``--fc-units=400``, ``--z-dim=100``, ``--fc-bn=no``, ``--lr-gen`` = ``--lr`` = 0.001, Adam with
betas (0.9, 0.999)):

    encoder  D -> 400 -> 400 (ReLU), then two linear maps 400 -> 100: mu (with a bias) and
             log sigma^2 (without one: his ``fc_layer_split`` builds the log-variance layer
             with ``bias=False``, 2019 ``linear_nets.py`` and 2022 ``models/fc/layers.py``)
    decoder  100 -> 400 -> 400 (ReLU) -> D, sigmoid

and the loss of a batch of N inputs with D pixels each (his ``average=True``, weights 1 and 1):

    recon = 1/N sum_n 1/D sum_d BCE(x_hat_nd, x_nd)                          # Eq. R
    kl    = 1/N sum_n -1/2 sum_j (1 + logvar_nj - mu_nj^2 - exp(logvar_nj)) / D  # Eq. KL
    L(x)  = recon + kl

``train_step`` minimises ``w L(x) + (1 - w) L(x_replay)`` (his ``rnt * loss_cur + (1 - rnt) *
loss_replay``) with its own Adam. BCE needs targets in [0, 1]: the inputs are mapped linearly
from [lo, hi] to [0, 1] and the samples back. ``x_range = (lo, hi)`` (numbers or one pair per
channel) fixes the range, and an input outside it raises ValueError (his MNIST: [0, 1]);
``x_range=None`` takes each channel's range from the data, the running min and max of the
batches ``train_step`` has seen (kept in the state dict), so normalised inputs work too; on
MNIST or split_digits in [0, 1] the first batch already holds pixels 0 and 1. Initialisation:
``nn.Linear``'s default, U(+-1/sqrt(fan_in)) for weights and biases, the distribution of his
``excitability_modules.py`` ``LinearExcitability.reset_parameters``. The noise of sampling and
of the reparameterisation comes from the ``rng`` passed in (the plugin's own generator).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from cl_plugins.core.checks import check_int, check_positive


def vae_loss(x01: torch.Tensor, x_hat: torch.Tensor, mu: torch.Tensor,
             logvar: torch.Tensor) -> torch.Tensor:
    """Eq. R + Eq. KL: pixel-mean BCE plus the KL divided by the number of pixels, batch mean."""
    n = x01.shape[0]
    d = x01[0].numel()
    recon = F.binary_cross_entropy(x_hat.reshape(n, -1), x01.reshape(n, -1),
                                   reduction="none").mean(dim=1)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1) / d
    return (recon + kl).mean()


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers of ``sizes`` with a ReLU after each."""
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


class VAE(nn.Module):
    def __init__(self, input_shape: Sequence[int], fc_layers: int = 3, fc_units: int = 400,
                 z_dim: int = 100, lr: float = 0.001, betas: Tuple[float, float] = (0.9, 0.999),
                 x_range=None):
        super().__init__()
        check_int("fc_layers", fc_layers, 2)
        check_int("fc_units", fc_units, 1)
        check_int("z_dim", z_dim, 1)
        check_positive("lr", lr)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.z_dim = z_dim
        d = 1
        for s in self.input_shape:
            d *= s
        hidden = [fc_units] * (fc_layers - 1)
        self.encoder = _mlp([d] + hidden)
        self.to_mu = nn.Linear(fc_units, z_dim)
        self.to_logvar = nn.Linear(fc_units, z_dim, bias=False)
        self.decoder = nn.Sequential(_mlp([z_dim] + hidden), nn.Linear(fc_units, d),
                                     nn.Sigmoid())
        self.auto_range = x_range is None
        lo, hi = parse_x_range(x_range, self.input_shape[0])
        self.register_buffer("lo", lo.reshape(-1, *[1] * (len(self.input_shape) - 1)))
        self.register_buffer("hi", hi.reshape(-1, *[1] * (len(self.input_shape) - 1)))
        self.register_buffer("range_seen", torch.tensor(False))
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr, betas=tuple(betas))

    @torch.no_grad()
    def update_range(self, x: torch.Tensor) -> None:
        """``x_range=None``: widen [lo, hi] of each channel to the batch's min and max (the
        first batch sets them)."""
        flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1)
        lo, hi = flat.amin(dim=1).reshape(self.lo.shape), flat.amax(dim=1).reshape(self.hi.shape)
        if bool(self.range_seen):
            lo, hi = torch.minimum(lo, self.lo), torch.maximum(hi, self.hi)
        self.lo.copy_(lo)
        self.hi.copy_(torch.maximum(hi, lo + 1e-6))
        self.range_seen.fill_(True)

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs mapped to [0, 1] by [lo, hi]; ValueError for an input outside it."""
        u = (x - self.lo) / (self.hi - self.lo)
        if bool(((u < -1e-5) | (u > 1 + 1e-5)).any()):
            raise ValueError(f"VAE: an input lies outside x_range [{self.lo.flatten().tolist()}, "
                             f"{self.hi.flatten().tolist()}] (BCE needs inputs mapped to "
                             "[0, 1]); set x_range to the inputs' range, e.g. "
                             "[(0 - mean) / std, (1 - mean) / std] for normalised images")
        return u.clamp(0.0, 1.0)

    def encode(self, x01: torch.Tensor):
        h = self.encoder(x01.reshape(x01.shape[0], -1))
        return self.to_mu(h), self.to_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoded pixels in [0, 1], shaped as the inputs."""
        return self.decoder(z).reshape(z.shape[0], *self.input_shape)

    def _noise(self, shape, rng: Optional[torch.Generator]) -> torch.Tensor:
        return torch.randn(shape, generator=rng).to(self.lo.device)

    def loss(self, x: torch.Tensor, rng: Optional[torch.Generator] = None) -> torch.Tensor:
        """L(x) (Eq. R + Eq. KL) with one reparameterised draw of z per input."""
        x01 = self.to_unit(x)
        mu, logvar = self.encode(x01)
        z = mu + (0.5 * logvar).exp() * self._noise(mu.shape, rng)
        return vae_loss(x01, self.decode(z), mu, logvar)

    def train_step(self, x: torch.Tensor, x_replay: Optional[torch.Tensor] = None,
                   current_weight: float = 1.0, rng: Optional[torch.Generator] = None) -> float:
        self.train()
        if self.auto_range:
            self.update_range(x)
        self.optimizer.zero_grad()
        total = self.loss(x, rng)
        if x_replay is not None and x_replay.shape[0] > 0:
            total = current_weight * total + (1.0 - current_weight) * self.loss(x_replay, rng)
        total.backward()
        self.optimizer.step()
        return float(total.detach())

    @torch.no_grad()
    def sample(self, n: int, rng: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` decoded draws of z ~ N(0, I), mapped back to ``x_range``."""
        was = self.training
        self.eval()
        x = self.lo + (self.hi - self.lo) * self.decode(self._noise((n, self.z_dim), rng))
        self.train(was)
        return x


def parse_x_range(x_range, channels: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` tensors of ``channels`` values from None (= [0, 1]), ``[lo, hi]`` (numbers)
    or ``[[lo_c, ...], [hi_c, ...]]``; ValueError naming ``x_range`` otherwise. ``channels=None``
    (not known yet: a plugin's construction) accepts any common number of values."""
    if x_range is None:
        x_range = (0.0, 1.0)
    msg = (f"x_range must be None, [lo, hi] or [[lo per channel], [hi per channel]] with "
           f"lo < hi ({channels} channels); got {x_range!r}.")
    try:
        lo, hi = (torch.as_tensor(v, dtype=torch.float32).flatten() for v in x_range)
    except (TypeError, ValueError) as err:
        raise ValueError(msg) from err
    if channels is None:
        channels = max(lo.numel(), hi.numel())
    if lo.numel() == 1:
        lo = lo.expand(channels).clone()
    if hi.numel() == 1:
        hi = hi.expand(channels).clone()
    if lo.numel() != channels or hi.numel() != channels or not bool((lo < hi).all()) \
            or not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError(msg)
    return lo, hi
