"""Multi-digit addition as next-token prediction, for a tiny causal transformer.

A sample is ``a + b = c``: the digits of ``a`` and ``b`` (most significant first), then
the digits of the sum least significant first, the order in which carries propagate. The
inputs are the tokens but the last; the targets are the tokens shifted by one, with
every position before the sum set to -100 so only the answer is learned and scored. A
sample counts as right (``xp.metric.ExactMatch``) when every answer digit is predicted
right from the correct prefix, which is exactly when greedy decoding writes the sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from xp.data import Datasets

PLUS, EQUALS = 10, 11
VOCAB = 12
IGNORE = -100


def encode(a: Tensor, b: Tensor, digits: int) -> tuple[Tensor, Tensor]:
    """(inputs, targets) of the sums ``a + b`` of ``digits``-digit numbers."""
    powers = 10 ** torch.arange(digits - 1, -1, -1)
    a_digits = (a[:, None] // powers) % 10
    b_digits = (b[:, None] // powers) % 10
    c = a + b
    c_digits = (c[:, None] // 10 ** torch.arange(digits + 1)) % 10  # least significant first
    n = a.shape[0]
    sequence = torch.cat(
        [
            a_digits,
            torch.full((n, 1), PLUS),
            b_digits,
            torch.full((n, 1), EQUALS),
            c_digits,
        ],
        dim=1,
    )
    inputs, targets = sequence[:, :-1].clone(), sequence[:, 1:].clone()
    targets[:, : 2 * digits + 1] = IGNORE  # everything before the first answer digit
    return inputs, targets


def addition(
    *,
    digits: int = 3,
    train_size: int = 100_000,
    val_size: int = 2_000,
    test_size: int = 2_000,
    seed: int = 0,
) -> Datasets:
    """Random sums of ``digits``-digit numbers; val and test pairs never occur in training.

    Args:
        digits: Digits of each operand.
        train_size: Training sums (drawn with replacement from all pairs but the held-out).
        val_size: Held-out sums for validation.
        test_size: Held-out sums for ``test=``.
        seed: Seed of the draw (fixed, so every run sees the same data).
    """
    if digits < 1:
        raise ValueError(f"data.digits={digits} must be >= 1.")
    space = 10 ** (2 * digits)
    if val_size + test_size >= space:
        raise ValueError(
            f"data.val_size + data.test_size = {val_size + test_size} leaves no pair of "
            f"{digits}-digit numbers to train on; lower them."
        )
    g = torch.Generator().manual_seed(seed)
    held_out = torch.randperm(space, generator=g)[: val_size + test_size]
    taken = torch.zeros(space, dtype=torch.bool)
    taken[held_out] = True
    train_pairs = torch.randint(space, (train_size * 2,), generator=g)
    train_pairs = train_pairs[~taken[train_pairs]][:train_size]

    def split(pairs: Tensor) -> TensorDataset:
        return TensorDataset(*encode(pairs // 10**digits, pairs % 10**digits, digits))

    return Datasets(
        train=split(train_pairs),
        val=split(held_out[:val_size]),
        test=split(held_out[val_size:]),
    )


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP, with residuals (the unit FSDP shards)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"model.width={width} must be divisible by model.heads={heads}.")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        n, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(w, dim=2)
        q, k, v = (z.view(n, t, self.heads, w // self.heads).transpose(1, 2) for z in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.dropout(self.proj(attended.transpose(1, 2).reshape(n, t, w)))
        return x + self.dropout(self.mlp(self.norm2(x)))


class AdditionTransformer(nn.Module):
    """A small decoder-only transformer over the addition tokens.

    Args:
        digits: Digits of each operand (fixes the sequence length).
        width: Embedding width.
        depth: Number of blocks.
        heads: Attention heads per block.
        dropout: Dropout in the blocks.
    """

    def __init__(
        self,
        digits: int = 3,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.length = 3 * digits + 2
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.zeros(1, self.length, width))
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)
        nn.init.normal_(self.position, std=0.02)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.position[:, : tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
