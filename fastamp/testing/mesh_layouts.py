"""A small pre-LayerNorm MLP on every DeviceMesh layout, and fastamp's global norm checked on each.

Run under torchrun (gloo on CPU, or NCCL), as users launch jobs::

    torchrun --nproc-per-node 4 -m fastamp.testing.mesh_layouts --out results/
    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29400 \\
        -m fastamp.testing.mesh_layouts --out results/
    torchrun --nproc-per-node 4 -m fastamp.testing.mesh_layouts --bench fsdp_tp --out results/

Every rank builds the same model from the same seed and trains it on the same batch, laid out as
DDP, FSDP2, HSDP, TP, FSDP x TP, pipeline stages (plain DDP grads, or FSDP on a pipeline sub-mesh) or
experts (plain, or DTensor on an expert mesh), with fp32 and bf16 grads. For each layout, step 1 (clean)
checks fastamp's global norm against the fp64 norm of the full gradients assembled from every rank (each
element once), that every rank got the same norm bit for bit, that the step issued exactly the expected
number of collectives, that the parameters after the step equal stock's (where stock's clip runs) and
are identical across replicas; step 2 plants a NaN on one rank and checks that every rank skipped.
Rank 0 writes what it measured as JSON (``--out``); a failed check raises, and torchrun fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .._gradients import is_dtensor
from ..distributed import ShardedGradScaler, clip_grad_norm_
from ..grad_scaler import GradScaler
from .probes import Collectives

__all__ = ["LAYOUTS", "Layout", "MLP", "fully_shard_model", "main", "make_batch", "make_mesh", "make_model", "run_layout",
           "tp_plan"]

DIM, HIDDEN, OUT, BATCH, SEQ = 16, 32, 8, 8, 4
SCALE = 2.0**10
LR = 0.1


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, DIM)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


class MLP(nn.Module):
    """Two pre-LayerNorm MLP blocks, a final LayerNorm and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, OUT)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def make_model() -> MLP:
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():  # LayerNorm starts at 1/0: move it, so that its grads are not special
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(torch.randn_like(module.weight) * 0.1)
                module.bias.add_(torch.randn_like(module.bias) * 0.1)
    return model


def make_batch(step: int) -> Tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, SEQ, DIM, generator=g), torch.randn(BATCH, SEQ, OUT, generator=g)


@dataclass
class Layout:
    """One way of laying the model out over the ranks."""

    model: nn.Module
    scaler: GradScaler
    # forward + backward of one batch, loss scaled by ``scale`` (pipeline and experts need their own)
    backward: Callable[[Tensor, Tensor, float], None]
    collectives_per_step: int = 1
    # "compare": stock's clip is right here, and fastamp must match it; "record": say what stock does
    stock_clip: str = "compare"
    # DDP + fastamp.GradScaler: a NaN reaches the other ranks through DDP's all-reduce, so it is planted
    # in the last rank's batch; elsewhere it is planted in the last rank's gradient after the backward.
    nan_in_batch: bool = False
    notes: Dict[str, Any] = field(default_factory=dict)


def _plain_backward(model: nn.Module) -> Callable[[Tensor, Tensor, float], None]:
    def backward(x: Tensor, y: Tensor, scale: float) -> None:
        (F.mse_loss(model(x).float(), y) * scale).backward()

    return backward


def make_mesh(shape: Tuple[int, ...], names: Tuple[str, ...]):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def tp_plan(model: MLP, tp_mesh, replicate_norms: bool) -> None:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    for block in model.blocks:
        parallelize_module(block, tp_mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    if replicate_norms:  # as torchtitan's: LayerNorm and head parameters are Replicate DTensors on the tp mesh
        from torch.distributed.tensor import DTensor, distribute_module

        def inputs_as_replicate(module, inputs, mesh):
            return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False) for t in inputs)

        def outputs_local(module, outputs, mesh):
            return outputs.to_local()

        for module in [b.ln for b in model.blocks] + [model.norm, model.head]:
            distribute_module(module, tp_mesh, input_fn=inputs_as_replicate, output_fn=outputs_local)


def _ddp(world: int) -> Layout:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model())
    # DDP's grads are already all-reduced: fastamp.GradScaler needs no collective at all.
    return Layout(model, GradScaler("cpu", init_scale=SCALE), _plain_backward(model), collectives_per_step=0,
                  nan_in_batch=True)


def _ddp_sharded_scaler(world: int) -> Layout:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model())
    scaler = ShardedGradScaler("cpu", init_scale=SCALE, replicated_over=dist.group.WORLD)
    return Layout(model, scaler, _plain_backward(model))


def fully_shard_model(model: MLP, mesh, root: bool = True) -> MLP:
    from torch.distributed.fsdp import fully_shard

    units = [*model.blocks, model.head] + ([] if root else [model.norm])  # without a root, norm is a unit too
    for module in units:
        if any(True for _ in module.parameters()):
            fully_shard(module, mesh=mesh)
    if root:
        fully_shard(model, mesh=mesh)
    return model


def _fsdp(world: int) -> Layout:
    model = fully_shard_model(make_model(), make_mesh((world,), ("dp",)))
    return Layout(model, ShardedGradScaler("cpu", init_scale=SCALE), _plain_backward(model))


def _fsdp_plain_scaler(world: int) -> Layout:
    # fastamp.GradScaler reads the DTensor grads' placements itself: nothing to configure.
    model = fully_shard_model(make_model(), make_mesh((world,), ("dp",)))
    return Layout(model, GradScaler("cpu", init_scale=SCALE), _plain_backward(model))


def _hsdp(world: int) -> Layout:
    model = fully_shard_model(make_model(), make_mesh((2, world // 2), ("replicate", "shard")))
    return Layout(model, ShardedGradScaler("cpu", init_scale=SCALE), _plain_backward(model))


def _tp(world: int, replicate_norms: bool, fsdp: bool = False) -> Layout:
    """TP over all ranks, or FSDP x TP on a (dp 2, tp world/2) mesh."""
    model = make_model()
    if fsdp:
        mesh = make_mesh((2, world // 2), ("dp", "tp"))
        tp_plan(model, mesh["tp"], replicate_norms)
        fully_shard_model(model, mesh["dp"])
    else:
        tp_plan(model, make_mesh((world,), ("tp",)), replicate_norms)
    layout = Layout(model, ShardedGradScaler("cpu", init_scale=SCALE), _plain_backward(model),
                    stock_clip="compare" if replicate_norms else "record")
    if not replicate_norms:
        layout.notes["plain LayerNorm/head"] = ("sharded on the dp sub-mesh, replicas over tp" if fsdp
                                                else "replicas over the tp mesh ('auto')")
    return layout


def _stage_of(rank: int, world: int) -> int:
    return rank // (world // 2)


def _pipeline(world: int, fsdp: bool) -> Layout:
    """Two stages (blocks.0 | blocks.1 + norm + head, the latter in bf16), each data-parallel over
    world/2 ranks; activations and their grads sent by hand between the stages."""
    rank = dist.get_rank()
    half = world // 2
    stage = _stage_of(rank, world)
    model = make_model()
    if stage == 0:
        model.blocks[1], model.norm, model.head = nn.Identity(), nn.Identity(), nn.Identity()
    else:
        model.blocks[0] = nn.Identity()
        model.head.to(torch.bfloat16)
    dp_groups = [dist.new_group(list(range(s * half, (s + 1) * half))) for s in range(2)]
    dp_group = dp_groups[stage]
    dp_rank = rank - stage * half
    peer = rank + half if stage == 0 else rank - half
    if fsdp:
        mesh = make_mesh((2, half), ("pp", "dp"))
        fully_shard_model(model, mesh["dp"], root=False)  # each stage's units are driven by hand, not by a root forward
        scaler = ShardedGradScaler("cpu", init_scale=SCALE)
    else:
        # Plain grads: replicas over the stage's data-parallel group, disjoint across stages.
        scaler = ShardedGradScaler("cpu", init_scale=SCALE, replicated_over=dp_group)

    def backward(x: Tensor, y: Tensor, scale: float) -> None:
        rows = slice(dp_rank * BATCH // half, (dp_rank + 1) * BATCH // half)  # data parallel: a share of the batch
        x, y = x[rows], y[rows]
        if stage == 0:
            act = model.blocks[0](x)
            dist.send(act.detach().contiguous(), peer)
            grad = torch.empty_like(act)
            dist.recv(grad, peer)
            act.backward(grad)
        else:
            act = torch.empty(x.shape[0], SEQ, DIM)
            dist.recv(act, peer)
            act.requires_grad_(True)
            h = model.norm(model.blocks[1](act))
            out = model.head(h.to(torch.bfloat16)).float()
            share = 1 if fsdp else half  # FSDP averages the grads over the stage's ranks; the hand-made DDP sums
            (F.mse_loss(out, y) * scale / share).backward()
            dist.send(act.grad.contiguous(), peer)
        if not fsdp:  # what DDP does within the stage
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=dp_group)

    layout = Layout(model, scaler, backward, stock_clip="record")
    layout.notes["stock"] = "clip_grad_norm_ gives each stage its own norm"
    return layout


class Experts(nn.Module):
    """One expert per rank (a bf16 Linear): each rank holds its own, as plain tensors or as the
    rank's Shard(0) of one DTensor on the expert mesh."""

    def __init__(self, world: int, as_dtensor: bool) -> None:
        super().__init__()
        torch.manual_seed(1)
        full = torch.randn(world, DIM, DIM, dtype=torch.bfloat16) * 0.2
        rank = dist.get_rank()
        local = full[rank : rank + 1].clone()
        if as_dtensor:
            from torch.distributed.tensor import DTensor, Shard

            self.weight = nn.Parameter(DTensor.from_local(local, make_mesh((world,), ("ep",)), [Shard(0)], run_check=False))
        else:  # named by its rank: each rank's expert is a parameter of its own
            self.register_parameter(f"weight_{rank}", nn.Parameter(local))
        self.param_name = "weight" if as_dtensor else f"weight_{rank}"

    def local_weight(self) -> Tensor:
        weight = getattr(self, self.param_name)
        return weight.to_local() if is_dtensor(weight) else weight

    def forward(self, x: Tensor) -> Tensor:
        mine = (_ToExperts.apply(x).to(torch.bfloat16) @ self.local_weight()[0]).float()
        return _FromExperts.apply(mine)  # every expert's output, summed on every rank


class _ToExperts(torch.autograd.Function):
    """Identity forward; the input's gradient is the sum of every expert's (each rank has one)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class _FromExperts(torch.autograd.Function):
    """Sum of the experts' outputs on every rank; every rank holds the same loss, so the gradient
    passes through as it is."""

    @staticmethod
    def forward(ctx, y: Tensor) -> Tensor:
        y = y.contiguous().clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def _experts(world: int, as_dtensor: bool) -> Layout:
    model = make_model()
    model.experts = Experts(world, as_dtensor)
    experts = set(model.experts.parameters())
    if as_dtensor:
        scaler = ShardedGradScaler("cpu", init_scale=SCALE)  # dense plain grads: replicas over the ep mesh
    else:
        scaler = ShardedGradScaler("cpu", init_scale=SCALE,
                                   replicated_over=lambda p: None if p in experts else dist.group.WORLD)

    def backward(x: Tensor, y: Tensor, scale: float) -> None:
        h = model.blocks[0](x)
        h = h + model.experts(h)
        out = model.head(model.norm(model.blocks[1](h)))
        (F.mse_loss(out, y) * scale).backward()

    layout = Layout(model, scaler, backward, stock_clip="record")
    layout.notes["stock"] = "clip_grad_norm_ counts the dense grads on every rank" if not as_dtensor else \
        "clip_grad_norm_ mixes DTensor and plain grads"
    return layout


LAYOUTS: Dict[str, Callable[[int], Layout]] = {
    "ddp": _ddp,
    "ddp_sharded_scaler": _ddp_sharded_scaler,
    "fsdp": _fsdp,
    "fsdp_plain_scaler": _fsdp_plain_scaler,
    "hsdp": _hsdp,
    "tp": lambda w: _tp(w, True),
    "tp_plain_norms": lambda w: _tp(w, False),
    "fsdp_tp": lambda w: _tp(w, True, fsdp=True),
    "fsdp_tp_plain_norms": lambda w: _tp(w, False, fsdp=True),
    "pp_ddp": lambda w: _pipeline(w, False),
    "pp_fsdp": lambda w: _pipeline(w, True),
    "experts": lambda w: _experts(w, False),
    "experts_dtensor": lambda w: _experts(w, True),
}


# ---- the checks ----------------------------------------------------------------------------------


def _full(t: Tensor) -> Tensor:
    return (t.full_tensor() if is_dtensor(t) else t).detach().double().clone()


def _assemble(tensors: Dict[str, Tensor]) -> Dict[str, List[Tensor]]:
    """Every rank's full tensors by name: replicas appear once per holder, disjoint pieces once."""
    gathered: List[Dict[str, Tensor]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, {k: v for k, v in tensors.items()})
    merged: Dict[str, List[Tensor]] = {}
    for per_rank in gathered:
        for name, value in per_rank.items():
            merged.setdefault(name, []).append(value)
    return merged


def _plain_name(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name  # DDP's wrapper


def _named_grads(model: nn.Module) -> Dict[str, Tensor]:
    return {_plain_name(name): _full(p.grad) for name, p in model.named_parameters() if p.grad is not None}


def _named_params(model: nn.Module) -> Dict[str, Tensor]:
    return {_plain_name(name): _full(p) for name, p in model.named_parameters()}


def _same_on_every_rank(value: float) -> bool:
    values: List[float] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(values, value)
    return all(v.hex() == values[0].hex() for v in values)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(f"rank {dist.get_rank()}: {message}")


def _stock_clip(model: nn.Module, max_norm: float) -> Tuple[Optional[float], Optional[Dict[str, Tensor]], str]:
    """Stock unscale + clip_grad_norm_ on a copy of the grads: (norm, clipped grads, what happened)."""
    params = [p for p in model.parameters() if p.grad is not None]
    saved = [p.grad.detach().clone() for p in params]
    try:
        for p in params:
            p.grad.mul_(1.0 / SCALE)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm = norm.full_tensor() if is_dtensor(norm) else norm
        clipped = _named_grads(model)
        return float(norm), clipped, "ran"
    except Exception as exc:  # noqa: BLE001 -- what stock does on this layout is a finding, not a failure
        return None, None, f"raises {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    finally:
        for p, g in zip(params, saved):
            p.grad.copy_(g)


def run_layout(name: str, world: int) -> Dict[str, Any]:
    """Build the layout and check a clean step and a skipped one (see the module's docstring)."""
    layout = LAYOUTS[name](world)
    model, scaler = layout.model, layout.scaler
    opt = torch.optim.SGD(model.parameters(), lr=LR, foreach=False)
    clip = scaler.clip_grad_norm_
    result: Dict[str, Any] = {"layout": name, "world": world, **layout.notes}

    # Step 1, clean: the global norm against the fp64 norm of the assembled full gradients.
    scaler.scale(torch.ones(()))
    x, y = make_batch(0)
    layout.backward(x, y, SCALE)
    assembled = _assemble(_named_grads(model))
    expected_names = {n for n, _ in make_model().named_parameters()}
    _check(expected_names <= set(assembled), f"{name}: gradients missing: {sorted(expected_names - set(assembled))}")
    oracle = math.sqrt(sum(float(copies[0].square().sum()) for copies in assembled.values())) / SCALE
    max_norm = oracle / 2
    stock_norm, stock_grads, stock = _stock_clip(model, max_norm)
    if stock_norm is not None:
        stock = f"ran: norm {stock_norm:.6g} ({stock_norm / oracle:.4g} x the true norm on rank {dist.get_rank()})"
    if isinstance(scaler, ShardedGradScaler):  # the function entry point, clipping off: writes nothing
        function_norm = float(clip_grad_norm_(model.parameters(), math.inf, replicated_over=scaler.replicated_over)) / SCALE
        _check(abs(function_norm - oracle) <= 1e-6 * oracle,
               f"{name}: fastamp.distributed.clip_grad_norm_ gave {function_norm}, fp64 oracle {oracle}")
    before = _named_params(model)
    with Collectives() as collectives:
        norm = clip(opt, max_norm)
        scaler.step(opt)
        scaler.update()
    norm_value = float(norm)
    result.update(norm=norm_value.hex(), oracle=oracle, relative_error=abs(norm_value - oracle) / oracle,
                  collectives=collectives.calls, stock=stock)
    _check(result["relative_error"] <= 1e-6, f"{name}: norm {norm_value} vs fp64 oracle {oracle}")
    _check(_same_on_every_rank(norm_value), f"{name}: ranks computed different norms")
    _check(collectives.count == layout.collectives_per_step,
           f"{name}: {collectives.count} collectives in the clipped step ({collectives.calls}), "
           f"expected {layout.collectives_per_step}")
    after = _named_params(model)
    if layout.stock_clip == "compare":
        _check(stock_grads is not None, f"{name}: stock clip_grad_norm_ failed: {stock}")
        result["stock_norm"] = stock_norm
        _check(abs(stock_norm - oracle) <= 1e-5 * oracle, f"{name}: stock norm {stock_norm} vs {oracle}")
        for pname, grad in stock_grads.items():
            stock_param = before[pname] - LR * grad
            _check(torch.allclose(after[pname], stock_param, rtol=1e-5, atol=1e-6),
                   f"{name}: {pname} after the step differs from stock's")
    for pname, copies in _assemble(after).items():
        _check(all(torch.equal(c, copies[0]) for c in copies), f"{name}: replicas of {pname} differ after the step")

    # Step 2: a NaN on the last rank only; every rank skips, parameters bit-identical, scale backed off.
    x, y = make_batch(1)
    if layout.nan_in_batch and dist.get_rank() == world - 1:
        x[-1, -1, -1] = math.nan
    opt.zero_grad()
    layout.backward(x, y, scaler.get_scale())
    if not layout.nan_in_batch and dist.get_rank() == world - 1:
        local = [p.grad.to_local() if is_dtensor(p.grad) else p.grad for p in model.parameters() if p.grad is not None]
        target = next(g for g in local if g.numel() > 0)
        target.view(-1)[-1] = math.nan
    before = _named_params(model)
    scale_before = scaler.get_scale()
    with Collectives() as collectives:
        clip(opt, max_norm)
        scaler.step(opt)
        scaler.update()
    after = _named_params(model)
    _check(all(torch.equal(before[k], after[k]) for k in before), f"{name}: a step with a NaN on one rank was taken")
    _check(scaler.get_scale() == scale_before / 2, f"{name}: the scale did not back off on a NaN")
    _check(collectives.count == layout.collectives_per_step, f"{name}: {collectives.calls} in the skipped step")
    result["nan_on_one_rank"] = "skipped on every rank"
    return result


def check_errors(world: int) -> Dict[str, str]:
    """What cannot be counted is refused before any collective, naming the parameter and what to do."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from .._gradients import LayoutError

    messages: Dict[str, str] = {}
    mesh = make_mesh((2, world // 2), ("dp", "tp"))
    partial = nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Replicate(), Replicate()]))
    partial.grad = DTensor.from_local(torch.ones(4, 4), mesh, [Replicate(), Partial()], run_check=False)
    sharded = nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Shard(0), Shard(1)]))
    sharded.grad = distribute_tensor(torch.ones(4, 4), mesh, [Shard(0), Shard(1)])
    cases = {
        "partial": lambda: clip_grad_norm_([sharded, partial], 1.0),
        "group does not span the mesh": lambda: clip_grad_norm_([sharded], 1.0, process_group=mesh["tp"].get_group()),
    }
    for case, call in cases.items():
        before = sharded.grad.to_local().clone()
        try:
            call()
        except LayoutError as exc:
            messages[case] = str(exc)
        else:
            raise AssertionError(f"{case}: no error")
        _check(torch.equal(sharded.grad.to_local(), before), f"{case}: the refused call wrote the grads")
    _check("parameters[1]" in messages["partial"] and "Partial" in messages["partial"], messages["partial"])
    _check("parameters[0]" in messages["group does not span the mesh"], messages["group does not span the mesh"])
    return messages


def check_checkpoint(world: int, folder: str) -> Dict[str, Any]:
    """HSDP + ShardedGradScaler through torch.distributed.checkpoint: a run saved after 3 steps and
    resumed in fresh objects ends bit-identical to the run that went on (scale grown, then backed off)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def build():
        model = fully_shard_model(make_model(), make_mesh((2, world // 2), ("replicate", "shard")))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
        return model, opt, ShardedGradScaler("cpu", init_scale=SCALE, growth_interval=2)

    def train(model, opt, scaler, steps) -> None:
        for step in steps:
            x, y = make_batch(step)
            if step == 4 and dist.get_rank() == world - 1:
                x[-1, -1, -1] = math.nan
            opt.zero_grad()
            scaler.scale(F.mse_loss(model(x), y)).backward()
            scaler.clip_grad_norm_(opt, 1.0)
            scaler.step(opt)
            scaler.update()

    model, opt, scaler = build()
    train(model, opt, scaler, range(3))
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state, "scaler": scaler.state_dict()}, checkpoint_id=folder)
    train(model, opt, scaler, range(3, 6))
    went_on, went_on_scaler = _named_params(model), scaler.state_dict()

    model, opt, scaler = build()
    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optim": optim_state, "scaler": scaler.state_dict()}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scaler.load_state_dict(state["scaler"])
    train(model, opt, scaler, range(3, 6))
    resumed = _named_params(model)
    _check(all(torch.equal(went_on[k], resumed[k]) for k in went_on), "a resumed run differs from the one that went on")
    _check(scaler.state_dict() == went_on_scaler, f"scaler {scaler.state_dict()} vs {went_on_scaler}")
    return {"scaler": went_on_scaler, "resumed": "bit-identical"}


def check_spike_guard(world: int) -> Dict[str, Any]:
    """FSDP2 + ShardedGradScaler + SpikeGuard, each rank on its own data: a spike in one rank's batch is
    seen in the global norm (or the global loss), and every rank skips that step, in the step's one
    collective."""
    from ..spike_guard import SpikeGuard

    outcome: Dict[str, Any] = {}
    for on in ("grad_norm", "loss"):
        model = fully_shard_model(make_model(), make_mesh((world,), ("dp",)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
        scaler = ShardedGradScaler("cpu", init_scale=SCALE, spike_guard=SpikeGuard(window=8, warmup=4, on=on))
        skipped, calls = [], []
        for step in range(10):
            x, y = make_batch(100 * dist.get_rank() + step)
            if step == 8 and dist.get_rank() == world - 1:
                x, y = x * 1000, y * 1000
            opt.zero_grad()
            scaler.scale(F.mse_loss(model(x), y)).backward()
            before = _named_params(model)
            with Collectives() as collectives:
                scaler.clip_grad_norm_(opt, 1.0)
                scaler.step(opt)
                scaler.update()
            calls.append(collectives.count)
            after = _named_params(model)
            skipped.append(all(torch.equal(before[k], after[k]) for k in before))
        counts = scaler.step_counts()
        _check(skipped == [False] * 8 + [True, False], f"spike guard on {on}: skipped {skipped}")
        _check(counts["spikes"] == 1 and counts["overflows"] == 0, f"spike guard on {on}: {counts}")
        _check(set(calls) == {1}, f"spike guard on {on}: collectives per step {calls}")
        _check(_same_on_every_rank(float(counts["spikes"])), "ranks disagree")
        outcome[on] = {"skipped": skipped, "counts": counts, "collectives_per_step": calls[0]}
    return outcome


def check_trainer(world: int, name: str) -> Dict[str, Any]:
    """FusedMixedPrecisionTrainer on a layout, with nothing distributed configured: its norm is the
    global one."""
    from ..trainer import FusedMixedPrecisionTrainer

    x, y = make_batch(0)
    oracle_layout = LAYOUTS[name](world)
    oracle_layout.backward(x, y, 1.0)
    oracle = math.sqrt(sum(float(c[0].square().sum()) for c in _assemble(_named_grads(oracle_layout.model)).values()))
    model = LAYOUTS[name](world).model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    trainer = FusedMixedPrecisionTrainer(model, opt, precision="fp32", max_grad_norm=oracle / 2, diagnose_overflows=False,
                                         loss_fn=lambda m, batch: F.mse_loss(m(batch[0]), batch[1]))
    norm = float(trainer.train_step((x, y))["grad_norm"])
    _check(abs(norm - oracle) <= 1e-6 * oracle, f"trainer on {name}: norm {norm} vs {oracle}")
    _check(_same_on_every_rank(norm), f"trainer on {name}: ranks disagree")
    return {"layout": name, "norm": norm, "oracle": oracle}


def bench_layout(name: str, world: int, repeats: int = 30) -> Dict[str, Any]:
    """Wall time and collectives of fastamp's clip vs stock unscale_ + clip_grad_norm_ on one layout,
    interleaved (each repeat runs both, in alternating order)."""
    layout = LAYOUTS[name](world)
    model = layout.model
    opt = torch.optim.SGD(model.parameters(), lr=LR, foreach=False)
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler as StockShardedGradScaler

    fastamp_scaler = ShardedGradScaler("cpu", init_scale=SCALE)
    stock_scaler = StockShardedGradScaler("cpu", init_scale=SCALE)
    x, y = make_batch(0)
    layout.backward(x, y, SCALE)
    saved = [p.grad.detach().clone() for p in model.parameters()]

    def restore() -> None:
        for p, g in zip(model.parameters(), saved):
            p.grad.copy_(g)

    def fastamp_clip() -> None:
        fastamp_scaler.clip_grad_norm_(opt, 1.0)
        fastamp_scaler.update()

    def stock_clip() -> None:
        stock_scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        stock_scaler.update()

    runs = {"fastamp": fastamp_clip, "stock": stock_clip}
    for s in (fastamp_scaler, stock_scaler):
        s.scale(torch.ones(()))
    stock_outcome = "ran"
    try:
        stock_clip()
    except Exception as exc:  # noqa: BLE001 -- stock refuses this layout: time fastamp alone
        stock_outcome = f"raises {type(exc).__name__}"
        del runs["stock"]
        stock_scaler = StockShardedGradScaler("cpu", init_scale=SCALE)
    times: Dict[str, List[float]] = {k: [] for k in runs}
    calls: Dict[str, List[str]] = {}
    for s in (fastamp_scaler, stock_scaler):
        s.scale(torch.ones(()))
    for key, run in runs.items():  # counted once, untimed: the profiler that counts them costs time
        restore()
        with Collectives() as collectives:
            run()
        calls[key] = collectives.calls
    for i in range(repeats + 3):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for key in order:
            restore()
            dist.barrier()
            start = time.perf_counter()
            runs[key]()
            elapsed = time.perf_counter() - start
            if i >= 3:  # warm-up
                times[key].append(elapsed)
            for s in (fastamp_scaler, stock_scaler):
                s.scale(torch.ones(()))
    return {
        "layout": name, "world": world, "repeats": repeats, "stock": stock_outcome,
        **{f"{k}_median_ms": statistics.median(v) * 1e3 for k, v in times.items()},
        **{f"{k}_iqr_ms": (statistics.quantiles(v, n=4)[2] - statistics.quantiles(v, n=4)[0]) * 1e3 for k, v in times.items()},
        **{f"{k}_collectives": len(v) for k, v in calls.items()},
        **{f"{k}_collective_ops": v for k, v in calls.items()},
        **{f"{k}_times_s": v for k, v in times.items()},
    }


def _default_layouts(world: int) -> List[str]:
    if world == 4:
        return list(LAYOUTS)
    if world % 2 == 0:  # the 2-D layouts at their other size (2 x world/2)
        return ["fsdp", "hsdp", "fsdp_tp", "fsdp_tp_plain_norms", "pp_ddp"]
    return ["ddp", "ddp_sharded_scaler", "fsdp", "fsdp_plain_scaler", "tp", "tp_plain_norms", "experts", "experts_dtensor"]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="*", default=None, help=f"default: all of {sorted(LAYOUTS)}")
    parser.add_argument("--bench", nargs="*", default=None, help="time these layouts' clip against stock's instead")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=None, help="folder for rank 0's JSON")
    parser.add_argument("--no-checks", action="store_true", help="only the layouts: no error, checkpoint, trainer checks")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    try:
        if args.bench is not None:
            results = [bench_layout(name, world, args.repeats) for name in (args.bench or ["fsdp_tp"])]
            kind = "bench"
        else:
            results = [run_layout(name, world) for name in (args.layouts or _default_layouts(world))]
            kind = "layouts"
            if world == 4 and not args.no_checks:
                folder = os.path.join(args.out or ".", "dcp-checkpoint")
                results.append({"layout": "checks", "errors": check_errors(world),
                                "checkpoint": check_checkpoint(world, folder),
                                "spike_guard": check_spike_guard(world),
                                "trainer": [check_trainer(world, name) for name in ("hsdp", "tp_plain_norms", "fsdp_tp")]})
        if dist.get_rank() == 0 and args.out:
            os.makedirs(args.out, exist_ok=True)
            record = {"torch": torch.__version__, "world": world, "results": results,
                      "nodes": int(os.environ.get("GROUP_WORLD_SIZE", "1"))}
            with open(os.path.join(args.out, f"{kind}-world{world}.json"), "w") as f:
                json.dump(record, f, indent=1)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without C++ static destructors: a torch background thread sometimes aborts the process at
    # interpreter teardown ("terminate called without an active exception") after a clean run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
