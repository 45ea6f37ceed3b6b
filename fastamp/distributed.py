"""fastamp on torch.distributed: DDP, FSDP2 and any job where each rank holds a shard of the gradients.

* DDP: :class:`fastamp.GradScaler` and :class:`fastamp.FusedMixedPrecisionTrainer` work unchanged (DDP
  has already all-reduced the grads; the trainer accumulates under ``no_sync()``).
* Sharded grads (FSDP2 ``fully_shard``, ZeRO-style shards, DTensor grads): :class:`ShardedGradScaler`,
  a drop-in for ``torch.distributed.fsdp.sharded_grad_scaler.ShardedGradScaler``, and
  :func:`clip_grad_norm_`. Each rank computes found_inf and the squared norm of its shard in one pass;
  both travel in ONE packed all-reduce, and every rank then takes the same decision on the device:
  skip on every rank if any rank overflowed, clip with the global norm. No host sync is needed for the
  decision (PyTorch's sharded scaler all-reduces found_inf per device, and the clip's norm separately).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ._gradients import clip_gradients, grads_by_device
from .grad_scaler import GradScaler

__all__ = ["ShardedGradScaler", "clip_grad_norm_", "reduce_norm_and_found_inf"]

ProcessGroup = Optional["dist.ProcessGroup"]


def reduce_norm_and_found_inf(
    local_norm: Tensor, found_inf: Tensor, process_group: ProcessGroup = None
) -> Tuple[Tensor, Tensor]:
    """Global L2 norm and found_inf from each rank's local ones, in one all-reduce.

    Packs ``[local_norm**2, found_inf]`` in fp64, sums them across ``process_group`` (default: the
    world), and returns ``(sqrt(sum of squares) as fp32, 1.0 if any rank found inf/nan else 0.0)``,
    both on ``local_norm``'s device, without a host sync.
    """
    packed = torch.stack([local_norm.double().reshape(()).square(), found_inf.double().reshape(())])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group)
    total_norm = packed[0].sqrt().float()
    found = (packed[1] > 0).float()
    return total_norm, found.to(found_inf.device)


def clip_grad_norm_(
    parameters: Union[Tensor, Iterable[Tensor]],
    max_norm: float,
    process_group: ProcessGroup = None,
    inv_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> Tensor:
    """Clip sharded gradients to a global L2 norm: ``torch.nn.utils.clip_grad_norm_`` for grads split
    across ranks (plain shards or DTensor grads), with one all-reduce and no host sync.

    Each rank passes the parameters whose gradient shards it holds. With ``inv_scale`` the grads are
    unscaled by the same multiply and the norm is that of the unscaled grads; ``found_inf`` (if given)
    receives the global inf/nan flag, and then nothing is written when it is set. Returns the global norm
    (fp32, on the grads' device). All grads of a rank must be on one device.
    """
    by_device = grads_by_device(list(parameters) if not isinstance(parameters, Tensor) else parameters)
    if len(by_device) > 1:
        raise ValueError(f"fastamp.distributed.clip_grad_norm_: grads on several devices {sorted(map(str, by_device))}")
    home = next(iter(by_device), inv_scale.device if inv_scale is not None else torch.device("cpu"))
    result = clip_gradients(by_device, max_norm, inv_scale=inv_scale, home=home,
                            reduce=lambda norm, found: reduce_norm_and_found_inf(norm, found, process_group))
    with torch.no_grad():
        result.apply_(by_device, skip_on_found_inf=found_inf is not None)
        if found_inf is not None:
            found = result.found_inf.to(found_inf.device)
            found_inf.copy_(torch.maximum(found_inf.reshape(found.shape), found).reshape(found_inf.shape))
    return result.total_norm


class ShardedGradScaler(GradScaler):
    """:class:`fastamp.GradScaler` for sharded gradients (FSDP2, ZeRO-style shards), a drop-in for
    ``torch.distributed.fsdp.sharded_grad_scaler.ShardedGradScaler`` (same constructor, argument order
    included, and same behaviour), with fastamp's additions.

    ``unscale_`` (and the check for fused optimizers) all-reduces found_inf once per optimizer, so that
    every rank skips the step when any rank overflowed. :meth:`clip_grad_norm_` sends found_inf and the
    squared shard norm in one packed all-reduce and clips with the global norm. fp16 grads are accepted,
    as in PyTorch's sharded scaler. Every rank must call the same methods in the same order (they are
    collectives), including ranks that hold no gradients.

    Args:
        process_group: the group the gradients are sharded over (default: the world); for hybrid
            sharding, the shard group.
        The others: as :class:`fastamp.GradScaler`.
    """

    _record_checks_without_grads = True

    def __init__(
        self,
        device: str = "cuda",
        init_scale: float = 2.0**16,
        backoff_factor: float = 0.5,
        growth_factor: float = 2.0,
        growth_interval: int = 2000,
        enabled: bool = True,
        process_group: ProcessGroup = None,
        *,
        hysteresis: int = 1,
        min_scale: float = 0.0,
        max_scale: float = math.inf,
    ) -> None:
        super().__init__(device, init_scale=init_scale, growth_factor=growth_factor, backoff_factor=backoff_factor,
                         growth_interval=growth_interval, enabled=enabled, hysteresis=hysteresis,
                         min_scale=min_scale, max_scale=max_scale)
        self.process_group = process_group if process_group is not None else dist.group.WORLD

    def reduce_found_inf(self, found_inf_per_device: Dict[torch.device, Tensor]) -> Dict[torch.device, Tensor]:
        """One all-reduce of this optimizer's found_inf (all devices folded into one flag), so that every
        rank skips the step when any rank overflowed."""
        home = self.get_scale_tensor().device
        flags = found_inf_per_device
        if flags:
            local = torch.stack([f.to(home, non_blocking=True).reshape(()) for f in flags.values()]).amax()
        else:
            local = torch.zeros((), dtype=torch.float32, device=home)
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.process_group)
        if not flags:
            return {home: local}
        return {d: (local if d == home else local.to(d, non_blocking=True)) for d in flags}

    def reduce_norm_and_found_inf(self, total_norm: Tensor, found_inf: Tensor) -> Tuple[Tensor, Tensor]:
        return reduce_norm_and_found_inf(total_norm, found_inf, self.process_group)

    def clip_grad_norm_(self, optimizer, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """As :meth:`fastamp.GradScaler.clip_grad_norm_`, with the global norm over all ranks' shards and
        one packed all-reduce. Only the L2 norm is supported for sharded grads."""
        if float(norm_type) != 2.0:
            raise ValueError(f"fastamp.distributed.ShardedGradScaler.clip_grad_norm_: only norm_type=2 is supported "
                             f"for sharded gradients, got {norm_type}")
        return super().clip_grad_norm_(optimizer, max_norm, norm_type, error_if_nonfinite)
