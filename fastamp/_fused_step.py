"""A fused optimizer's step written as traceable tensor code, for the optimizer-side step compiled whole.

``torch.optim`` wraps every ``step()`` in ``torch._dynamo.graph_break()`` calls, and on CUDA its fused
Adam/AdamW runs with Dynamo disabled unless ``capturable=True``: ``torch.compile(fullgraph=True)`` of
``clip_grad_norm_`` + ``scaler.step(optimizer)`` + ``update`` cannot go through ``optimizer.step()``.
Under compilation, :class:`fastamp.GradScaler` calls :func:`fused_step` instead: the same ATen fused
kernels ``optimizer.step()`` calls (``_fused_adam``, ``_fused_adamw``, ``_fused_sgd``), the same lazy state
initialisation (the optimizer's own ``_init_group``, which Dynamo runs at trace time, so the state is made
outside the graph and marked static for CUDA graphs) and step counting: the compiled step gives the eager
step's bits. The kernels are called
through their functional variants and the results copied back: the in-place ones fail functionalization
when a list argument is empty (``max_exp_avg_sqs`` without amsgrad; torch 2.14). Inductor turns the copies
back into in-place writes.

What it leaves out: the optimizer's step hooks (``register_step_pre_hook`` / ``post_hook``) do not run in a
compiled step, as they cannot run inside a graph. A ``lr`` held as a Python float becomes a constant of
the graph (a new value recompiles); hold it as a tensor (fastamp's schedules do) to change it freely.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["fused_step", "has_fused_step"]

_ATEN = torch.ops.aten


def has_fused_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`fused_step` can stand in for ``optimizer.step()``: torch's Adam, AdamW or SGD with
    ``fused=True`` in every parameter group."""
    return type(optimizer) in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD) and all(
        group.get("fused") for group in optimizer.param_groups
    )


def fused_step(optimizer: torch.optim.Optimizer, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """``optimizer.step()`` of a fused Adam, AdamW or SGD, as ``GradScaler`` drives it (the grads divided by
    ``grad_scale``; nothing changes where ``found_inf`` is 1), in code Dynamo traces whole."""
    if not has_fused_step(optimizer):
        raise TypeError(f"fastamp: no traceable fused step for {type(optimizer).__name__} (fused Adam, AdamW, SGD only)")
    with torch.no_grad():
        for group in optimizer.param_groups:
            if isinstance(optimizer, torch.optim.SGD):
                _sgd_group(optimizer, group, grad_scale, found_inf)
            else:
                _adam_group(optimizer, group, grad_scale, found_inf)


def _on(device: torch.device, tensor: Optional[Tensor]) -> Optional[Tensor]:
    return tensor if tensor is None or tensor.device == device else tensor.to(device)


def _lr_on(device: torch.device, lr):
    # As torch does: a CPU lr tensor goes to the kernels as it is, another device's is moved.
    if isinstance(lr, Tensor) and lr.device.type != "cpu" and lr.device != device:
        return lr.to(device)
    return lr


def _copy_back(targets: List[Tensor], results: List[Tensor]) -> None:
    if targets:
        torch._foreach_copy_(targets, results)


def _adam_group(optimizer: torch.optim.Optimizer, group: dict, grad_scale: Optional[Tensor],
                found_inf: Optional[Tensor]) -> None:
    amsgrad = bool(group["amsgrad"])
    decoupled = bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
    beta1, beta2 = group["betas"]
    lists: List[List[Tensor]] = [[], [], [], [], [], []]
    # torch's own lazy state initialisation and checks. Dynamo runs this method at trace time (it
    # intercepts _init_group): the state is made outside the graph and marked static for CUDA graphs.
    optimizer._init_group(group, *lists)
    buckets: Dict[Tuple[torch.device, torch.dtype], List[List[Tensor]]] = {}
    for i, p in enumerate(lists[0]):
        bucket = buckets.setdefault((p.device, p.dtype), [[], [], [], [], [], []])
        for k in range(6):
            if k != 4 or amsgrad:
                bucket[k].append(lists[k][i])
    kernel = _ATEN._fused_adamw if decoupled else _ATEN._fused_adam
    for (device, _), (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps) in buckets.items():
        lr = _lr_on(device, group["lr"])
        overload = kernel.tensor_lr if isinstance(lr, Tensor) else kernel.default
        device_found_inf = _on(device, found_inf)
        torch._foreach_add_(steps, 1)
        out = overload(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2,
                       weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=amsgrad,
                       maximize=group["maximize"], grad_scale=_on(device, grad_scale), found_inf=device_found_inf)
        for targets, results in zip((params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs), out):
            _copy_back(targets, results)
        if device_found_inf is not None:
            torch._foreach_sub_(steps, [device_found_inf] * len(steps))


def _sgd_group(optimizer: torch.optim.Optimizer, group: dict, grad_scale: Optional[Tensor],
               found_inf: Optional[Tensor]) -> None:
    momentum = group["momentum"]
    params: List[Tensor] = []
    grads: List[Tensor] = []
    buffers: List[Optional[Tensor]] = []
    optimizer._init_group(group, params, grads, buffers)  # torch's checks; see _adam_group
    # A parameter's first step with momentum starts its buffer from the gradient (is_first_step); torch's
    # fused SGD takes that per call, so fresh and running buffers go to separate calls.
    buckets: Dict[Tuple[torch.device, torch.dtype, bool], List[List[Tensor]]] = {}
    for p, grad, buffer in zip(params, grads, buffers):
        fresh = momentum != 0 and buffer is None
        if fresh:
            # Zeros, not torch's empty_like: a skipped first step leaves the zeros GradScaler.step leaves eagerly.
            buffer = optimizer.state[p]["momentum_buffer"] = torch.zeros_like(grad)
        bucket = buckets.setdefault((p.device, p.dtype, fresh), [[], [], []])
        bucket[0].append(p)
        bucket[1].append(grad)
        if momentum != 0:
            bucket[2].append(buffer)
    for (device, _, fresh), (device_params, device_grads, device_buffers) in buckets.items():
        lr = _lr_on(device, group["lr"])
        overload = _ATEN._fused_sgd.tensor_lr if isinstance(lr, Tensor) else _ATEN._fused_sgd.default
        out = overload(device_params, device_grads, device_buffers, weight_decay=group["weight_decay"],
                       momentum=momentum, lr=lr, dampening=group["dampening"], nesterov=group["nesterov"],
                       maximize=group["maximize"], is_first_step=fresh, grad_scale=_on(device, grad_scale),
                       found_inf=_on(device, found_inf))
        for targets, results in zip((device_params, device_grads, device_buffers), out):
            _copy_back(targets, results)
