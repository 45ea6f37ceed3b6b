"""Gradient-list workloads shared by the benchmarks: shapes like real models' parameters."""

from __future__ import annotations

from typing import List, Tuple

import torch

__all__ = ["gpt2_small_shapes", "make_grads", "small_tensor_shapes"]


def gpt2_small_shapes() -> List[Tuple[int, ...]]:
    """Parameter shapes of GPT-2 small (124,439,808 parameters in 148 tensors, embeddings tied)."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: List[Tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def small_tensor_shapes(count: int = 2000, numel: int = 4096) -> List[Tuple[int, ...]]:
    """Many small tensors: where launch and per-tensor overhead dominate."""
    return [(numel,)] * count


def make_grads(shapes, dtype=torch.float32, device="cpu", seed: int = 0) -> List[torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(s, generator=generator).to(device=device, dtype=dtype) for s in shapes]
