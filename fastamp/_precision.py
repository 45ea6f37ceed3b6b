"""Precision names: every spelling fastamp accepts (Lightning's included) and the autocast dtype of each.
One table, used by the trainer, the demo and :func:`fastamp.diagnose_overflow`."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["autocast_dtype", "normalize_precision"]

_PRECISIONS = {
    "fp32": "fp32", "32": "fp32", "32-true": "fp32", "float32": "fp32",
    "fp16": "fp16", "16": "fp16", "16-mixed": "fp16", "float16": "fp16",
    "bf16": "bf16", "bf16-mixed": "bf16", "bfloat16": "bf16",
}
_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def normalize_precision(precision: str) -> str:
    """``"fp32"``, ``"fp16"`` or ``"bf16"`` for any of their spellings (Lightning's included)."""
    try:
        return _PRECISIONS[str(precision)]
    except KeyError:
        raise ValueError(f"fastamp: unknown precision {precision!r}; use one of {sorted(_PRECISIONS)}") from None


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` runs ``precision`` in; ``None`` for fp32 (no autocast)."""
    return _AUTOCAST_DTYPES.get(normalize_precision(precision))
