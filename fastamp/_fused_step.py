"""A fused optimizer's step written as traceable tensor code, for the optimizer-side step compiled whole.

``torch.optim`` wraps every ``step()`` in ``torch._dynamo.graph_break()`` calls, and on CUDA its fused
Adam/AdamW runs with Dynamo disabled unless ``capturable=True``: ``torch.compile(fullgraph=True)`` of
``clip_grad_norm_`` + ``scaler.step(optimizer)`` + ``update`` cannot go through ``optimizer.step()``.
Under compilation, :class:`fastamp.GradScaler` calls :func:`fused_step` instead: the same ATen fused
kernels ``optimizer.step()`` calls (``_fused_adam``, ``_fused_adamw``, ``_fused_sgd``), the same lazy state
initialisation (the optimizer's own ``_init_group``, which Dynamo runs at trace time, so the state is made
outside the graph and marked static for CUDA graphs) and step counting: the compiled step gives the eager
step's bits. The kernels are called through two custom ops declared here (``fastamp::fused_adam_step_``,
``fastamp::fused_sgd_step_``) whose schemas name what they mutate: torch's in-place ``_fused_adamw_`` traced
directly fails functionalization when a list argument is empty (``max_exp_avg_sqs`` without amsgrad; torch
2.14), and its functional variant copies every list twice (3x slower than eager on CPU, measured); inductor
runs a mutating custom op in place on the graph's inputs, as eager does.

What it leaves out: the optimizer's step hooks (``register_step_pre_hook`` / ``post_hook``) do not run in a
compiled step, as they cannot run inside a graph. A ``lr`` held as a Python float becomes a constant of
the graph (a new value recompiles); hold it as a tensor (fastamp's schedules do) to change it freely.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["fused_step", "has_fused_step"]


@torch.library.custom_op("fastamp::fused_adam_step_",
                         mutates_args=("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"))
def _fused_adam_step_(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                      max_exp_avg_sqs: List[Tensor], steps: List[Tensor], lr: float, lr_tensor: Optional[Tensor],
                      beta1: float, beta2: float, weight_decay: float, eps: float, amsgrad: bool, maximize: bool,
                      decoupled_weight_decay: bool, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    kernel = torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_
    kernel(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=lr if lr_tensor is None else lr_tensor,
           beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize,
           grad_scale=grad_scale, found_inf=found_inf)


@_fused_adam_step_.register_fake
def _(*args, **kwargs) -> None:
    return None


@torch.library.custom_op("fastamp::fused_sgd_step_", mutates_args=("params", "grads", "momentum_buffers"))
def _fused_sgd_step_(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], lr: float,
                     lr_tensor: Optional[Tensor], weight_decay: float, momentum: float, dampening: float, nesterov: bool,
                     maximize: bool, is_first_step: bool, grad_scale: Optional[Tensor],
                     found_inf: Optional[Tensor]) -> None:
    torch._fused_sgd_(params, grads, momentum_buffers, weight_decay=weight_decay, momentum=momentum,
                      lr=lr if lr_tensor is None else lr_tensor, dampening=dampening, nesterov=nesterov,
                      maximize=maximize, is_first_step=is_first_step, grad_scale=grad_scale, found_inf=found_inf)


@_fused_sgd_step_.register_fake
def _(*args, **kwargs) -> None:
    return None


def _lr_args(lr) -> Tuple[float, Optional[Tensor]]:
    return (0.0, lr) if isinstance(lr, Tensor) else (float(lr), None)


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
        for into, full in zip(bucket, lists):
            if full:  # max_exp_avg_sqs is empty without amsgrad
                into.append(full[i])
    for (device, _), (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps) in buckets.items():
        device_found_inf = _on(device, found_inf)
        torch._foreach_add_(steps, 1)
        _fused_adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *_lr_args(_lr_on(device, group["lr"])),
                          beta1, beta2, group["weight_decay"], group["eps"], amsgrad, group["maximize"], decoupled,
                          _on(device, grad_scale), device_found_inf)
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
        _fused_sgd_step_(device_params, device_grads, device_buffers, *_lr_args(_lr_on(device, group["lr"])),
                         group["weight_decay"], momentum, group["dampening"], group["nesterov"], group["maximize"],
                         fresh, _on(device, grad_scale), _on(device, found_inf))
