"""The batch protocol shared by FusedMixedPrecisionTrainer and :func:`fastamp.diagnose_overflow`: how a
batch reaches the model's device and how a loss comes out of the model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["Batch", "LossFn", "compute_loss", "to_device"]

Batch = Union[Mapping, Sequence, Tensor, Any]
LossFn = Callable[[nn.Module, Any], Tensor]


def to_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` with every tensor in it (nested dicts, lists, tuples) moved to ``device``, non-blocking."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def compute_loss(model: nn.Module, batch: Batch, loss_fn: Optional[LossFn] = None) -> Tensor:
    """The loss of one batch: ``loss_fn(model, batch)`` when given; else the batch goes to the model (dict:
    ``model(**batch)``, tuple/list: ``model(*batch)``, else ``model(batch)``) and the loss is the output
    itself, ``output["loss"]`` or ``output.loss``."""
    if loss_fn is not None:
        return loss_fn(model, batch)
    if isinstance(batch, Mapping):
        output = model(**batch)
    elif isinstance(batch, (list, tuple)):
        output = model(*batch)
    else:
        output = model(batch)
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "loss" in output:
        return output["loss"]
    if hasattr(output, "loss"):
        return output.loss
    raise TypeError(
        "the model's output is not a loss tensor, a dict with 'loss' or an object with .loss "
        f"(got {type(output).__name__}); pass loss_fn=..."
    )
