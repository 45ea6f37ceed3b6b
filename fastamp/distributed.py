"""fastamp on torch.distributed: DDP, FSDP2, HSDP, tensor / pipeline / expert parallelism, on any DeviceMesh.

The global gradient norm counts every element exactly once, whatever the layout, and travels with
found_inf in ONE all-reduce per step; every rank gets the same norm, clip coefficient and skip decision
bit for bit, so replicas stay identical and an overflow on any rank skips the step everywhere.

* DTensor gradients (``fully_shard`` on a 1-D or 2-D mesh, HSDP, TP, FSDP x TP, experts on a sub-mesh,
  pipeline stages on sub-meshes) say how they are held: nothing to pass, to any entry point
  (:class:`fastamp.GradScaler`, :class:`ShardedGradScaler`, :func:`clip_grad_norm_`, the trainer,
  the Lightning plugin, ``apply_fastamp``). ``Shard`` counts fully, a ``Replicate`` mesh dim once,
  ``Partial`` is refused naming the parameter.
* Plain-tensor gradients say it with ``replicated_over`` (see :func:`fastamp._gradients.local_grads`):
  DDP's grads are replicas over its group (or use :class:`fastamp.GradScaler`, which needs no
  collective for them); a pipeline stage's own parameters and experts are disjoint (``None``).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ._gradients import LayoutError, LocalGrads, ReplicatedOver, clip_gradients, local_grads, reduce_across_ranks
from .grad_scaler import GradScaler
from .spike_guard import SpikeGuard

__all__ = ["LayoutError", "ShardedGradScaler", "clip_grad_norm_", "reduce_across_ranks"]

ProcessGroup = Optional["dist.ProcessGroup"]


def clip_grad_norm_(
    parameters: Union[Tensor, Iterable[Tensor]],
    max_norm: float,
    process_group: ProcessGroup = None,
    inv_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    *,
    replicated_over: ReplicatedOver = "auto",
) -> Tensor:
    """Clip gradients held across ranks to their global L2 norm: ``torch.nn.utils.clip_grad_norm_`` for
    any layout, in one all-reduce, with no host sync.

    Each rank passes the parameters whose gradients (or shards of them) it holds. DTensor gradients
    need nothing more, on any mesh. Plain gradients are this rank's shards (ZeRO-style) unless
    ``replicated_over`` says they are replicas over a group (DDP) or per parameter (a callable: expert
    parallelism); ``"auto"`` takes plain gradients next to DTensor ones as replicas over the DTensors'
    meshes (TP's unsharded modules). ``process_group`` (default: the world) is the group of the
    all-reduce; it must hold every rank that holds a piece of the gradients.

    With ``inv_scale`` the grads are unscaled by the same multiply and the norm is that of the unscaled
    grads; ``found_inf`` (if given) receives the global inf/nan flag, and then nothing is written when
    it is set. Returns the global norm (fp32, on the grads' device). All grads of a rank must be on one
    device.
    """
    grads = local_grads(parameters if isinstance(parameters, Tensor) else list(parameters),
                        process_group=process_group, replicated_over=replicated_over, plain_grads_are_shards=True)
    by_device = grads.by_device
    if len(by_device) > 1:
        raise ValueError(f"fastamp.distributed.clip_grad_norm_: grads on several devices {sorted(map(str, by_device))}")
    home = next(iter(by_device), inv_scale.device if inv_scale is not None else torch.device("cpu"))
    result = clip_gradients(grads, max_norm, inv_scale=inv_scale, home=home)
    with torch.no_grad():
        result.apply_(grads, skip_on_found_inf=found_inf is not None)
        if found_inf is not None:
            found = result.found_inf.to(found_inf.device)
            found_inf.copy_(torch.maximum(found_inf.reshape(found.shape), found).reshape(found_inf.shape))
    return result.total_norm


class ShardedGradScaler(GradScaler):
    """:class:`fastamp.GradScaler` for gradients held across ranks, a drop-in for
    ``torch.distributed.fsdp.sharded_grad_scaler.ShardedGradScaler`` (same constructor, argument order
    included, and same behaviour), with fastamp's additions.

    ``unscale_`` (and the check for fused optimizers) all-reduces found_inf once per optimizer, so that
    every rank skips the step when any rank overflowed. :meth:`clip_grad_norm_` sends found_inf and the
    squared norm of what this rank counts in ONE all-reduce and clips with the global norm, every
    element counted once on any mesh (FSDP2, HSDP, TP, FSDP x TP, pipeline, experts). fp16 grads are
    accepted, as in PyTorch's sharded scaler. Every rank of ``process_group`` must call the same methods
    in the same order (they are collectives), including ranks that hold no gradients.

    Args:
        process_group: the group of the all-reduce (default: the world). It must hold every rank that
            holds a piece of the gradients: the world is always right; for DTensor grads no other group
            is needed on any mesh (HSDP included).
        replicated_over: how plain (non-DTensor) gradients are held (see
            :func:`fastamp.distributed.clip_grad_norm_`); default ``"auto"``: ZeRO-style shards, or
            replicas over the DTensors' meshes when DTensor gradients are present.
        The others: as :class:`fastamp.GradScaler`.
    """

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
        replicated_over: ReplicatedOver = "auto",
        hysteresis: int = 1,
        min_scale: float = 0.0,
        max_scale: float = math.inf,
        spike_guard: Optional[SpikeGuard] = None,
    ) -> None:
        super().__init__(device, init_scale=init_scale, growth_factor=growth_factor, backoff_factor=backoff_factor,
                         growth_interval=growth_interval, enabled=enabled, hysteresis=hysteresis,
                         min_scale=min_scale, max_scale=max_scale, spike_guard=spike_guard)
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.replicated_over = replicated_over

    def local_grads(self, optimizer: torch.optim.Optimizer) -> LocalGrads:
        return local_grads(optimizer, process_group=self.process_group, replicated_over=self.replicated_over,
                           plain_grads_are_shards=True)

    def clip_grad_norm_(self, optimizer, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False, *,
                        per_param_norms: bool = False) -> Tensor:
        """As :meth:`fastamp.GradScaler.clip_grad_norm_`, with the global norm over all ranks' gradients
        and one all-reduce. Only the L2 norm is supported for gradients held across ranks."""
        if float(norm_type) != 2.0:
            raise ValueError(f"fastamp.distributed.ShardedGradScaler.clip_grad_norm_: only norm_type=2 is supported "
                             f"for sharded gradients, got {norm_type}")
        return super().clip_grad_norm_(optimizer, max_norm, norm_type, error_if_nonfinite, per_param_norms=per_param_norms)
