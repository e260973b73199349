"""A GAN on a 2-D mixture of Gaussians: two optimizers, stepped in turn by ``train_step``.

The real data are points around ``modes`` Gaussians on a circle. The model steps its
discriminator and its generator itself, through the named optimizer wrappers of
``optim=gan`` (``optim_wrapper["discriminator"]``, ``optim_wrapper["generator"]``), and
returns both losses, which xp logs as ``train/loss_d`` and ``train/loss_g``. Validation
draws as many generated points as real ones and scores them: ``quality`` is the share of
generated points within ``3 * std`` of a mode, ``modes`` the share of modes hit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from xp.data import Datasets
from xp.optim import OptimWrapperDict


def _centers(modes: int, radius: float) -> Tensor:
    angles = torch.arange(modes) * (2 * math.pi / modes)
    return torch.stack([angles.cos(), angles.sin()], dim=1) * radius


def gaussian_mixture(
    *,
    modes: int = 8,
    radius: float = 2.0,
    std: float = 0.05,
    train_size: int = 16_384,
    val_size: int = 2_048,
    seed: int = 0,
) -> Datasets:
    """Points from ``modes`` Gaussians of deviation ``std`` on a circle of ``radius``.

    Batches are 1-tuples ``(points,)``: the model's ``train_step`` takes them as they are.
    """
    if modes < 1 or std <= 0 or radius <= 0:
        raise ValueError(
            f"data: modes={modes} must be >= 1 and std={std}, radius={radius} positive."
        )
    g = torch.Generator().manual_seed(seed)

    def draw(n: int) -> TensorDataset:
        which = torch.randint(modes, (n,), generator=g)
        points = _centers(modes, radius)[which] + std * torch.randn(n, 2, generator=g)
        return TensorDataset(points)

    return Datasets(train=draw(train_size), val=draw(val_size))


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inputs, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, outputs),
    )


class GAN2D(nn.Module):
    """A generator and a discriminator, each an MLP, trained in turn on every batch.

    Args:
        latent_dim: Size of the generator's noise input.
        hidden: Width of both MLPs.
        modes, radius, std: The mixture the data come from (for scoring at validation).
    """

    def __init__(
        self,
        latent_dim: int = 8,
        hidden: int = 128,
        modes: int = 8,
        radius: float = 2.0,
        std: float = 0.05,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.generator = _mlp(latent_dim, hidden, 2)
        self.discriminator = _mlp(2, hidden, 1)
        self.centers: Tensor
        self.register_buffer("centers", _centers(modes, radius), persistent=False)
        self.std = std

    def forward(self, noise: Tensor) -> Tensor:
        """Generated points for ``noise`` of shape (N, latent_dim)."""
        return self.generator(noise)

    def noise(self, n: int, like: Tensor) -> Tensor:
        return torch.randn(n, self.latent_dim, device=like.device, dtype=like.dtype)

    def train_step(
        self, batch: tuple[Tensor], optim_wrapper: OptimWrapperDict
    ) -> dict[str, Tensor]:
        (real,) = batch
        n = real.shape[0]
        d_optim, g_optim = optim_wrapper["discriminator"], optim_wrapper["generator"]
        with d_optim.optim_context():
            fake = self.generator(self.noise(n, real)).detach()
            real_logits, fake_logits = self.discriminator(real), self.discriminator(fake)
            loss_d = F.binary_cross_entropy_with_logits(
                real_logits, torch.ones_like(real_logits)
            ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        d_optim.update_params(loss_d)
        with g_optim.optim_context():
            logits = self.discriminator(self.generator(self.noise(n, real)))
            loss_g = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        g_optim.update_params(loss_g)
        # The generator's backward also reached the discriminator; its next step must not
        # see those gradients.
        d_optim.zero_grad()
        return {"loss_d": loss_d, "loss_g": loss_g}

    def val_step(self, batch: tuple[Tensor]) -> dict[str, Tensor]:
        (real,) = batch
        fake = self.generator(self.noise(real.shape[0], real))
        distance, nearest = torch.cdist(fake, self.centers).min(dim=1)
        close = distance < 3 * self.std
        hit = torch.zeros(len(self.centers), device=fake.device)
        hit[nearest[close]] = 1.0
        return {"quality": close.float(), "modes": hit.mean()}
