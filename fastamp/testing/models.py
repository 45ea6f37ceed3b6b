"""The test transformer of the reference notebook, for the demo, tests and benchmarks.

A decoder-style language model: token embedding (+ learned positions), pre-norm layers of multi-head
self-attention and a GELU feed-forward, a final LayerNorm and an LM head. ``forward(input_ids,
labels=None)`` returns ``{"logits", "loss"}`` like the notebook's ``TestTransformerModel``, so it plugs
into :class:`fastamp.trainer.FusedMixedPrecisionTrainer` with dict batches. :func:`synthetic_batches`
gives a learnable task (each token is a fixed function of the previous one), so the loss really falls.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["MODEL_SIZES", "TransformerConfig", "TransformerLM", "build_model", "synthetic_batches"]


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes of :class:`TransformerLM`. ``seq_len`` bounds the learned positions."""

    vocab_size: int = 1000
    d_model: int = 512
    num_layers: int = 4
    num_heads: int = 8
    dim_feedforward: Optional[int] = None  # 4 * d_model when None
    seq_len: int = 128
    causal: bool = True
    gradient_checkpointing: bool = False

    @property
    def ffn_dim(self) -> int:
        return self.dim_feedforward or 4 * self.d_model


# Sizes for the demo: the embedding and LM head carry most parameters while the activations stay small,
# so the optimizer-side phase is a visible share of a step, as in large-vocabulary LMs.
MODEL_SIZES: Dict[str, TransformerConfig] = {
    "tiny": TransformerConfig(vocab_size=512, d_model=64, num_layers=2, num_heads=4, seq_len=32),
    "small": TransformerConfig(vocab_size=16384, d_model=256, num_layers=2, num_heads=4, seq_len=64),
    "base": TransformerConfig(vocab_size=32000, d_model=512, num_layers=4, num_heads=8, seq_len=128),
}


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))`` then ``x + ffn(ln2(x))``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model)
        self.self_attn = nn.MultiheadAttention(config.d_model, config.num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.feedforward = nn.Sequential(
            nn.Linear(config.d_model, config.ffn_dim), nn.GELU(), nn.Linear(config.ffn_dim, config.d_model)
        )
        self.causal = config.causal

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        mask = None
        if self.causal:
            mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        attn, _ = self.self_attn(h, h, h, attn_mask=mask, need_weights=False)
        x = x + attn
        return x + self.feedforward(self.norm2(x))


class TransformerLM(nn.Module):
    """The notebook's test transformer with pre-norm layers; optional gradient checkpointing per block."""

    def __init__(self, config: TransformerConfig = TransformerConfig()) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position = nn.Embedding(config.seq_len, config.d_model)
        self.layers = nn.ModuleList([TransformerBlock(config) for _ in range(config.num_layers)])
        self.norm = nn.LayerNorm(config.d_model)
        self.output_projection = nn.Linear(config.d_model, config.vocab_size)

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None) -> Dict[str, Tensor]:
        if input_ids.shape[1] > self.config.seq_len:
            raise ValueError(
                f"TransformerLM: input_ids has {input_ids.shape[1]} positions, more than seq_len={self.config.seq_len}"
            )
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embedding(input_ids) + self.position(positions)
        for layer in self.layers:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        logits = self.output_projection(self.norm(x))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        return out


def build_model(size: str = "tiny", **overrides) -> TransformerLM:
    """A :class:`TransformerLM` of a named size (``tiny``, ``small``, ``base``), with fields overridden."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    return TransformerLM(TransformerConfig(**{**asdict(MODEL_SIZES[size]), **overrides}))


def synthetic_batches(
    config: TransformerConfig,
    batch_size: int = 8,
    seq_len: Optional[int] = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    num_tokens: Optional[int] = None,
) -> Iterator[Dict[str, Tensor]]:
    """Endless ``{"input_ids", "labels"}`` batches of a learnable task.

    Each sequence starts at a random token and follows a fixed random permutation of the vocabulary
    (``next = perm[token]``), so the next token is a function of the current one; labels are the
    inputs shifted by one. The same seed gives the same batches. ``num_tokens`` restricts the data to
    the first that many token ids (the task is learned in fewer steps; the model keeps its size).
    """
    seq_len = seq_len or config.seq_len
    num_tokens = min(num_tokens or config.vocab_size, config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_tokens, generator=generator)
    while True:
        tokens = torch.empty(batch_size, seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, num_tokens, (batch_size,), generator=generator)
        for i in range(seq_len):
            tokens[:, i + 1] = perm[tokens[:, i]]
        yield {"input_ids": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device)}
