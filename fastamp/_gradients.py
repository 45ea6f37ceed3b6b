"""The gradient core: the one module that walks gradients and clips them.

Every clip path in fastamp (``GradScaler.clip_grad_norm_``, ``ShardedGradScaler``,
``fastamp.distributed.clip_grad_norm_``, the Lightning plugin and ``FusedMixedPrecisionTrainer``) goes
through :func:`clip_gradients`:

1. gradients collected by device (:func:`grads_by_device`: dense, sparse values, DTensor shards),
   and for a job across ranks sorted by :func:`local_grads` into those this rank counts in the global
   norm and the replicas another rank counts (read from DTensor placements; said for plain tensors);
2. split into what fastamp's kernels take and what PyTorch's ops take (:func:`split_for_kernels`:
   fp32/fp16/bf16 anywhere, fp64 on CPU; fp64 on CUDA goes to PyTorch);
3. per device, one read pass for the norm and found_inf (:func:`norm_and_check`);
4. reduced across devices here, and across ranks in ONE packed all-reduce (:func:`reduce_across_ranks`)
   whatever the number of meshes and dtypes, so that every rank gets the same norm and flag bit for bit;
5. the clip coefficient, and the factor that unscales and clips in one multiply.

Where everything is on one device and nothing crosses ranks (the common single-GPU step), 3-5 are one
op, ``ops.clip_norm``: on CUDA the norm's finishing kernel also writes the coefficient and the factor,
so a clipped step is the norm pass, one finish and the scale pass (none with a fused optimizer).

The caller then either folds the factor into a fused optimizer's ``grad_scale`` or writes it
(:func:`scale_grads_`, nothing written on overflow). Clipping switched off (``max_norm`` None, 0 or
inf) means no coefficient at all: the factor is exactly ``inv_scale`` (or nothing), never
``clip_coef(inf, inf)``, which is NaN when a diverging run's fp32 norm overflows.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops

__all__ = [
    "ClipResult",
    "LayoutError",
    "LocalGrads",
    "PerDevice",
    "ReplicatedOver",
    "clip_gradients",
    "grads_by_device",
    "is_dtensor",
    "kernel_handles",
    "local_grads",
    "merge_by_device",
    "named_norms",
    "norm_and_check",
    "reduce_across_ranks",
    "scale_grads_",
    "split_for_kernels",
    "unscale_check_grads_",
    "unscale_check_norm_grads_",
]

GradSource = Union[torch.optim.Optimizer, Tensor]
# Who holds copies of a plain (non-DTensor) gradient: see :func:`local_grads`.
ReplicatedOver = Union[str, None, "dist.ProcessGroup", Any, Callable[[Tensor], Any]]


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (FSDP2's sharded parameters and grads); torch.distributed may be absent."""
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def kernel_handles(grad: Tensor) -> bool:
    """Whether fastamp's ops take this gradient (see ``fastamp.ops.kernel_dtypes``); the rest go to
    PyTorch's ops."""
    return grad.dtype in ops.kernel_dtypes(grad.device)


def split_for_kernels(grads: Iterable[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
    """(gradients fastamp's ops take, the others)."""
    fused: List[Tensor] = []
    other: List[Tensor] = []
    for g in grads:
        (fused if kernel_handles(g) else other).append(g)
    return fused, other


class PerDevice:
    """Copies of a scalar tensor on each device that asks, made once (non-blocking)."""

    def __init__(self, master: Tensor) -> None:
        self.master = master
        self._copies: Dict[torch.device, Tensor] = {master.device: master}

    def get(self, device: torch.device) -> Tensor:
        copy = self._copies.get(device)
        if copy is None:
            copy = self.master.to(device=device, non_blocking=True, copy=True)
            self._copies[device] = copy
        return copy


def _named_params(sources: Iterable[GradSource]) -> Iterator[Tuple[str, Tensor]]:
    """Each parameter with a name for error messages: where it sits in its optimizer, or in the list."""
    for i, source in enumerate(sources):
        if isinstance(source, torch.optim.Optimizer):
            for g, group in enumerate(source.param_groups):
                for p, param in enumerate(group["params"]):
                    if not isinstance(param, Tensor):
                        raise AssertionError(f"expected param to be torch.Tensor, got {type(param).__name__}")
                    yield f"{type(source).__name__}.param_groups[{g}]['params'][{p}]", param
        else:
            yield f"parameters[{i}]", source


def _as_sources(sources: Union[GradSource, Iterable[GradSource]]) -> List[GradSource]:
    if isinstance(sources, (torch.optim.Optimizer, Tensor)):
        return [sources]
    return list(sources)


def _local_view(param: Tensor) -> Optional[Tensor]:
    """The gradient as this rank holds it: the local shard of a DTensor (a view, written in place),
    the values of a sparse grad (fp16 ones coalesced first, as PyTorch does: duplicate indices of
    scaled values can overflow when summed later)."""
    grad = param.grad
    if grad is None:
        return None
    if is_dtensor(grad):
        grad = grad.to_local()
    if grad.is_sparse:
        if grad.dtype is torch.float16:
            param.grad = grad = grad.coalesce()
        grad = grad._values()
    return grad


def grads_by_device(sources: Union[GradSource, Iterable[GradSource]]) -> Dict[torch.device, List[Tensor]]:
    """The gradients of optimizers or parameters as this rank holds them, grouped by device (DTensor
    grads as their local shard, sparse grads as their values)."""
    by_device: Dict[torch.device, List[Tensor]] = defaultdict(list)
    for _, param in _named_params(_as_sources(sources)):
        grad = _local_view(param)
        if grad is not None:
            by_device[grad.device].append(grad)
    return dict(by_device)


def merge_by_device(groups: Iterable[Dict[torch.device, List[Tensor]]]) -> Dict[torch.device, List[Tensor]]:
    """The concatenation, per device, of several :func:`grads_by_device` results."""
    merged: Dict[torch.device, List[Tensor]] = defaultdict(list)
    for group in groups:
        for device, grads in group.items():
            merged[device].extend(grads)
    return dict(merged)


# ---- where the ranks' gradients meet ------------------------------------------------------------------


class LayoutError(ValueError):
    """Gradients whose layout across ranks fastamp cannot count exactly once (names the parameter)."""


@dataclass
class LocalGrads:
    """A rank's gradients, and how they enter the global norm.

    ``counted``: the local tensors this rank counts in the global norm; ``duplicates``: tensors whose
    every element some other rank counts (a replica), checked for inf/nan but not counted here. The sum
    over the ranks of ``group`` of each rank's counted squares is the global squared norm, every element
    counted exactly once. ``group`` is None when nothing crosses ranks (one process, or DDP, whose
    gradients are already reduced).
    """

    counted: Dict[torch.device, List[Tensor]] = field(default_factory=dict)
    duplicates: Dict[torch.device, List[Tensor]] = field(default_factory=dict)
    group: Optional[Any] = None
    crosses_ranks: bool = False
    # The parameters whose gradients these are, list for list (for per-parameter norms).
    counted_params: Dict[torch.device, List[Tensor]] = field(default_factory=dict)
    duplicate_params: Dict[torch.device, List[Tensor]] = field(default_factory=dict)

    @property
    def by_device(self) -> Dict[torch.device, List[Tensor]]:
        """Every local gradient (counted or not), by device: what a write touches."""
        return merge_by_device([self.counted, self.duplicates])

    @staticmethod
    def merge(parts: Sequence["LocalGrads"]) -> "LocalGrads":
        """Several optimizers' gradients clipped together (one norm, one collective)."""
        crossing = [p for p in parts if p.crosses_ranks]
        groups = {id(p.group): p.group for p in crossing}
        if len(groups) > 1:
            raise LayoutError("fastamp: optimizers clipped together reduce over different process groups; "
                              "clip them separately or give them one process_group")
        return LocalGrads(merge_by_device([p.counted for p in parts]), merge_by_device([p.duplicates for p in parts]),
                          next(iter(groups.values()), None), bool(crossing),
                          merge_by_device([p.counted_params for p in parts]),
                          merge_by_device([p.duplicate_params for p in parts]))


def _ranks_of(group: Any) -> FrozenSet[int]:
    """Global ranks of a process group or a device mesh."""
    if hasattr(group, "mesh") and hasattr(group, "get_coordinate"):  # DeviceMesh
        return frozenset(int(r) for r in group.mesh.flatten().tolist())
    return frozenset(dist.get_process_group_ranks(group))


def _root_of(mesh: Any) -> Any:
    get_root = getattr(mesh, "_get_root_mesh", None)
    if get_root is not None:
        return get_root()
    from torch.distributed.device_mesh import _mesh_resources  # torch < 2.12

    return _mesh_resources.get_root_mesh(mesh)


@dataclass(frozen=True)
class _MeshGeometry:
    root: Tuple[Tuple[int, ...], Tuple[int, ...]]  # the root mesh: its shape and its ranks (a key, not an object)
    ranks: FrozenSet[int]  # this mesh's ranks
    spanned: FrozenSet[int]  # the root dims this mesh spans
    coordinate: Tuple[int, ...]  # this rank's coordinate in the root


_GEOMETRY: Dict[int, Tuple[Any, _MeshGeometry]] = {}


def _mesh_geometry(mesh: Any) -> _MeshGeometry:
    """Where a mesh sits in its root mesh, read once per mesh object (host only, no collective).

    A mesh cut from a bigger one (``mesh["dp"]``, a flattened ``mesh["dp", "cp"]._flatten()``) spans
    the root dims along which a step from this rank stays inside it."""
    cached = _GEOMETRY.get(id(mesh))
    if cached is not None and cached[0]() is mesh:
        return cached[1]
    root = _root_of(mesh)
    ranks = _ranks_of(mesh)
    grid = root.mesh
    where = (grid == dist.get_rank()).nonzero()
    coordinate = tuple(int(c) for c in where[0].tolist()) if len(where) else ()
    spanned = set()
    for dim, size in enumerate(grid.shape):
        if size > 1 and coordinate:
            step = list(coordinate)
            step[dim] = (step[dim] + 1) % size
            if int(grid[tuple(step)]) in ranks:
                spanned.add(dim)
    key = (tuple(grid.shape), tuple(int(r) for r in grid.flatten().tolist()))
    geometry = _MeshGeometry(key, ranks, frozenset(spanned), coordinate)
    _GEOMETRY[id(mesh)] = (weakref.ref(mesh), geometry)
    return geometry


def _placement_kind(placement: Any) -> str:
    name = type(placement).__name__
    if name == "_StridedShard" or placement.is_shard():
        return "shard"
    if placement.is_replicate():
        return "replicate"
    if placement.is_partial():
        return "partial"
    return name


def _dtensor_counted_here(label: str, grad: Tensor, spanned_by_root: Dict[Any, set]) -> bool:
    """Whether this rank counts its shard of a DTensor gradient: once per Replicate mesh dim (the
    coordinate-0 copy), and once along the dims of its root mesh that the grad's mesh does not span but
    another of this rank's gradients' meshes does (FSDP x TP: a LayerNorm sharded on the dp sub-mesh
    is replicated over tp). Root dims no gradient here spans hold other parameters (pipeline stages)."""
    mesh = grad.device_mesh
    for dim, placement in enumerate(grad.placements):
        kind = _placement_kind(placement)
        if kind == "partial":
            raise LayoutError(
                f"fastamp: the gradient of {label} (shape {list(grad.shape)}) is Partial on mesh dim {dim} of "
                f"{mesh}: its shards are unreduced sums, whose norm is not the gradient's. Reduce it first "
                f"(grad.redistribute(placements=[Replicate() ...]) or let FSDP/TP reduce it) before clipping.")
        if kind not in ("shard", "replicate"):
            raise LayoutError(f"fastamp: the gradient of {label} has placement {placement!r} on mesh dim {dim}, which "
                              "fastamp does not know how to count; supported: Shard, _StridedShard, Replicate")
    coordinate_on = mesh.get_coordinate()
    if coordinate_on is None:
        return False  # this rank is not in the mesh: it holds nothing of it
    for dim, placement in enumerate(grad.placements):
        if _placement_kind(placement) == "replicate" and coordinate_on[dim] != 0:
            return False
    geometry = _mesh_geometry(mesh)
    for dim in spanned_by_root[geometry.root] - geometry.spanned:
        if geometry.coordinate[dim] != 0:
            return False
    return True


def local_grads(
    sources: Union[GradSource, Iterable[GradSource]],
    *,
    process_group: Optional[Any] = None,
    replicated_over: ReplicatedOver = "auto",
    plain_grads_are_shards: bool = False,
) -> LocalGrads:
    """This rank's gradients, sorted into those it counts in the global norm and the replicas others count.

    DTensor gradients say how they are held: ``Shard`` (strided too) counts fully, each ``Replicate``
    mesh dim contributes once, ``Partial`` is refused (:class:`LayoutError`, naming the parameter).
    Plain gradients are held as ``replicated_over`` says:

    - ``"auto"`` (default): with DTensor gradients present, plain ones (TP's unsharded modules) are
      identical on every rank of the DTensors' meshes; without, they are this rank's alone: shards
      when ``plain_grads_are_shards`` (ZeRO-style, the sharded scaler), else already global (one
      process, DDP: no collective at all).
    - ``None``: disjoint: each rank holds its own (a pipeline stage's parameters, experts).
    - a process group or a device mesh: identical on its ranks (DDP's data-parallel group).
    - a callable ``param -> one of those``: per parameter (expert parallel: ``None`` for experts,
      the data-parallel group for the dense layers).

    ``process_group`` (default: the world) is the group of the one all-reduce: it must hold every rank
    that holds a piece of these gradients.
    """
    named = [(label, param) for label, param in _named_params(_as_sources(sources)) if param.grad is not None]
    dtensors = [(label, param.grad) for label, param in named if is_dtensor(param.grad)]
    distributed = dist.is_available() and dist.is_initialized()
    crosses = bool(dtensors) or (distributed and (plain_grads_are_shards or replicated_over not in ("auto",)))
    result = LocalGrads(crosses_ranks=crosses)
    if crosses and not distributed:
        raise LayoutError("fastamp: these gradients are held across ranks, but torch.distributed is not initialized")
    if not crosses:
        counted_here: Dict[torch.device, List[Tensor]] = defaultdict(list)
        params_here: Dict[torch.device, List[Tensor]] = defaultdict(list)
        for _, param in named:
            local = _local_view(param)
            counted_here[local.device].append(local)
            params_here[local.device].append(param)
        result.counted, result.counted_params = dict(counted_here), dict(params_here)
        return result
    group = process_group if process_group is not None else dist.group.WORLD
    result.group = group
    group_ranks = None if group is dist.group.WORLD else _ranks_of(group)
    me = dist.get_rank()

    spanned_by_root: Dict[Any, set] = defaultdict(set)
    mesh_ranks: set = set()
    for label, grad in dtensors:
        geometry = _mesh_geometry(grad.device_mesh)
        ranks = geometry.ranks
        if group_ranks is not None and not ranks <= group_ranks:
            raise LayoutError(
                f"fastamp: the gradient of {label} lives on {grad.device_mesh}, whose ranks {sorted(ranks)} are not all "
                f"in the process group of the reduction ({sorted(group_ranks)}): pass a process_group that spans every "
                f"mesh (the default, the world, always does)")
        spanned_by_root[geometry.root] |= geometry.spanned
        mesh_ranks |= ranks

    def plain_copies(param: Tensor) -> Optional[FrozenSet[int]]:
        holders = replicated_over(param) if callable(replicated_over) else replicated_over
        if holders == "auto":
            return frozenset(mesh_ranks) if dtensors else None
        if holders is None:
            return None
        return _ranks_of(holders)

    counted: Dict[torch.device, List[Tensor]] = defaultdict(list)
    duplicates: Dict[torch.device, List[Tensor]] = defaultdict(list)
    counted_params: Dict[torch.device, List[Tensor]] = defaultdict(list)
    duplicate_params: Dict[torch.device, List[Tensor]] = defaultdict(list)
    for label, param in named:
        grad = param.grad
        local = _local_view(param)
        if is_dtensor(grad):
            here = _dtensor_counted_here(label, grad, spanned_by_root)
        else:
            copies = plain_copies(param)
            if copies is not None and group_ranks is not None and not copies <= group_ranks:
                raise LayoutError(f"fastamp: {label} is replicated over ranks {sorted(copies)}, not all in the reduction's "
                                  f"process group ({sorted(group_ranks)})")
            here = copies is None or me == min(copies)
        (counted if here else duplicates)[local.device].append(local)
        (counted_params if here else duplicate_params)[local.device].append(param)
    result.counted, result.duplicates = dict(counted), dict(duplicates)
    result.counted_params, result.duplicate_params = dict(counted_params), dict(duplicate_params)
    return result


def reduce_across_ranks(local_norm: Tensor, found_inf: Tensor, group: Optional[Any] = None,
                        extra: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
    """The global L2 norm and found_inf from each rank's counted norm and local flag, in ONE all-reduce.

    Packs ``[local_norm**2, found_inf, *extra]`` in fp64 and sums them over ``group`` (default: the
    world); every rank gets the same sum bit for bit, so every rank takes the same decision. Returns
    ``(sqrt(sum) as fp32, 1.0 if any rank found inf/nan else 0.0)`` on ``local_norm``'s device, without a
    host sync; with ``extra`` (values that ride along, e.g. a loss to average), also their sums (fp64).
    """
    parts = [local_norm.double().reshape(1).square(), found_inf.double().reshape(1).to(local_norm.device)]
    if extra is not None:
        parts.append(extra.double().reshape(-1).to(local_norm.device))
    packed = torch.cat(parts)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    norm, found = packed[0].sqrt().float(), (packed[1] > 0).float().to(found_inf.device)
    if extra is None:
        return norm, found
    return norm, found, packed[2:].reshape(extra.shape)


def unscale_check_grads_(grads: List[Tensor], found_inf: Tensor, inv_scale: Tensor) -> None:
    """``g *= inv_scale`` and the inf/nan check, for grads on one device (fastamp's kernel where it
    applies, PyTorch's op for the rest)."""
    fused, other = split_for_kernels(grads)
    if fused:
        ops.unscale_check_(fused, found_inf, inv_scale)
    by_dtype: Dict[torch.dtype, List[Tensor]] = defaultdict(list)
    for g in other:
        by_dtype[g.dtype].append(g)
    for same_dtype in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(same_dtype, found_inf, inv_scale)


def unscale_check_norm_grads_(grads: List[Tensor], found_inf: Tensor, inv_scale: Tensor) -> Tensor:
    """:func:`unscale_check_grads_` that also returns the fp32 norm of the unscaled grads, from the same
    pass (what a spike guard watches when no clip computes the norm)."""
    fused, other = split_for_kernels(grads)
    total = ops.unscale_check_norm_(fused, found_inf, inv_scale)[0].float() if fused else found_inf.new_zeros(())
    if other:
        unscale_check_grads_(other, found_inf, inv_scale)
        squares = torch.stack([n.double() for n in torch._foreach_norm(other)]).square().sum()
        total = (total.double().square() + squares).sqrt().float()
    return total


def norm_and_check(grads: List[Tensor], inv_scale: Optional[Tensor], found_inf: Tensor,
                   per_tensor: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """fp32 L2 norm of ``g * inv_scale`` over grads on one device (one read pass), setting found_inf;
    with ``per_tensor``, also each gradient's norm (fp32, in ``grads``' order) from the same pass."""
    fused, other = split_for_kernels(grads)
    if fused:
        total, fused_per = ops.grad_norm(fused, inv_scale, found_inf, per_tensor=per_tensor)
    else:
        total, fused_per = found_inf.new_zeros(()), found_inf.new_zeros((0,))
    total = total.float()
    other_norms: Optional[Tensor] = None
    if other:
        other_norms = torch.stack([n.double() for n in torch._foreach_norm(other)])
        if inv_scale is not None:
            other_norms = other_norms * inv_scale.double().reshape(())
        flag = torch.stack([(~torch.isfinite(g)).any() for g in other]).any()
        found_inf.copy_(torch.where(flag, torch.ones_like(found_inf), found_inf))
        total = (total.double().square() + other_norms.square().sum()).sqrt().float()
    if not per_tensor:
        return total
    if other_norms is None:
        return total, fused_per.float()
    # Back into the grads' order: the kernels took the fused ones, PyTorch the others.
    order = [i for i, g in enumerate(grads) if kernel_handles(g)] + [i for i, g in enumerate(grads) if not kernel_handles(g)]
    per = torch.cat([fused_per.float().reshape(-1), other_norms.float()])
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return total, per[inverse.to(per.device)]


def scale_grads_(grads: List[Tensor], factor: Tensor, found_inf: Optional[Tensor]) -> None:
    """``g *= factor`` for grads on one device; nothing at all where ``found_inf`` is set."""
    fused, other = split_for_kernels(grads)
    if fused:
        ops.scale_(fused, factor, found_inf)
    for g in other:
        keep = factor.reshape(()) == 1
        if found_inf is not None:
            keep = keep | (found_inf.reshape(()) != 0)
        g.copy_(torch.where(keep.to(g.device), g, g * factor.to(g.dtype)))


@dataclass
class ClipResult:
    """What :func:`clip_gradients` decided, all on the devices, nothing read on the host.

    ``total_norm``: of the unscaled grads, before clipping (fp32, on ``home``). ``found_inf``: global
    flag on ``home``; ``found_inf_per_device``: the same on each grads' device. ``coef``: the clip
    coefficient, ``None`` when clipping is off. ``factor``: what multiplies the grads to unscale and
    clip them (``inv_scale * coef``, ``coef`` or ``inv_scale``), ``None`` when there is nothing to do.
    """

    total_norm: Tensor
    found_inf: Tensor
    found_inf_per_device: Dict[torch.device, Tensor]
    coef: Optional[Tensor]
    factor: Optional[Tensor]
    # With per_param_norms: (parameters, their unscaled pre-clip norms on one device), per device.
    per_param: Optional[List[Tuple[List[Tensor], Tensor]]] = None
    # What rode along in the cross-rank reduction (summed over the ranks), else as given.
    extra: Optional[Tensor] = None

    def apply_(self, grads: Union[LocalGrads, Dict[torch.device, List[Tensor]]], skip_on_found_inf: bool = True) -> None:
        """Write the factor into the grads (not on an overflow, unless ``skip_on_found_inf=False``)."""
        if self.factor is None:
            return
        by_device = grads.by_device if isinstance(grads, LocalGrads) else grads
        factors = PerDevice(self.factor)
        for device, grads in by_device.items():
            flag = self.found_inf_per_device.get(device) if skip_on_found_inf else None
            scale_grads_(grads, factors.get(device), flag)


def named_norms(per_param: Optional[List[Tuple[List[Tensor], Tensor]]],
                model: Union[torch.nn.Module, Iterable[Tuple[str, Tensor]]], depth: Optional[int] = None) -> Dict[str, float]:
    """``{name: norm}`` from a clip's per-parameter norms (:attr:`ClipResult.per_param`), in one host read;
    ``depth`` groups names by their first components, the norm of each group's norms."""
    if not per_param:
        return {}
    named = model.named_parameters() if isinstance(model, torch.nn.Module) else model
    names = {id(p): n for n, p in named}
    home = per_param[0][1].device
    values = torch.cat([norms.to(home).reshape(-1) for _, norms in per_param]).tolist()
    result: Dict[str, float] = {}
    for param, value in zip([p for ps, _ in per_param for p in ps], values):
        name = names.get(id(param))
        if name is None:
            continue
        if depth is not None:
            name = ".".join(name.split(".")[:depth])
            result[name] = math.sqrt(result.get(name, 0.0) ** 2 + value * value)
        else:
            result[name] = value
    return result


def clipping_enabled(max_norm: Optional[float]) -> bool:
    """Whether ``max_norm`` asks for clipping at all (None, 0 and inf do not)."""
    return max_norm is not None and 0 < float(max_norm) < math.inf


def _raise_if_nonfinite(total_norm: Tensor) -> None:
    # torch.nn.utils.clip_grad_norm_'s check and text (a host sync, as there).
    if bool(torch.logical_or(total_norm.isnan(), total_norm.isinf())):
        raise RuntimeError(
            "The total norm of order 2.0 for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )


def _clip_in_one_pass(grads: LocalGrads, devices: List[torch.device], max_norm: Optional[float],
                      home: torch.device) -> bool:
    """Whether the coefficient and the factor can come from the norm's own finish (``ops.clip_norm``):
    one device, which is home, nothing to reduce across ranks, every gradient one the kernels take."""
    return (clipping_enabled(max_norm) and not grads.crosses_ranks and devices == [home]
            and not grads.duplicates.get(home) and all(kernel_handles(g) for g in grads.counted.get(home, [])))


def clip_gradients(
    grads: Union[LocalGrads, Dict[torch.device, List[Tensor]]],
    max_norm: Optional[float],
    *,
    inv_scale: Optional[Tensor] = None,
    home: Optional[torch.device] = None,
    error_if_nonfinite: bool = False,
    per_param_norms: bool = False,
    extra: Optional[Tensor] = None,
) -> ClipResult:
    """The one clip routine: norm + found_inf of ``g * inv_scale`` in one read per device, summed
    across devices and, for gradients held across ranks (:func:`local_grads`), across ranks in one
    all-reduce; then the clip coefficient and the combined factor. Writes nothing: see
    :meth:`ClipResult.apply_`. A plain ``{device: grads}`` is one process's gradients.

    ``home`` is where the total norm and the global flag live (default: the first grads' device, else
    the CPU). ``error_if_nonfinite=True`` raises as ``torch.nn.utils.clip_grad_norm_`` does (a host sync).
    ``per_param_norms``: also each parameter's unscaled norm, from the same pass (this rank's piece of
    it for a sharded parameter). ``extra``: values summed over the ranks in the same all-reduce (a loss).
    """
    if not isinstance(grads, LocalGrads):
        grads = LocalGrads(counted=grads)
    devices = list(dict.fromkeys([*grads.counted, *grads.duplicates]))
    if home is None:
        home = inv_scale.device if inv_scale is not None else next(iter(devices), torch.device("cpu"))
    home = torch.device(home)
    if _clip_in_one_pass(grads, devices, max_norm, home):
        with torch.no_grad():
            found_inf = torch.zeros((), dtype=torch.float32, device=home)
            total_norm, per, coef, factor = ops.clip_norm(grads.counted.get(home, []), float(max_norm), inv_scale,
                                                          found_inf, per_tensor=per_param_norms)
            total_norm = total_norm.float()
            if error_if_nonfinite:
                _raise_if_nonfinite(total_norm)
        per_param_one = [(grads.counted_params.get(home, []), per.float())] if per_param_norms else None
        return ClipResult(total_norm, found_inf, {home: found_inf}, coef, factor, per_param_one, extra)
    inv_scales = PerDevice(inv_scale) if inv_scale is not None else None
    flags: Dict[torch.device, Tensor] = {}
    norms: List[Tensor] = []
    per_param: Optional[List[Tuple[List[Tensor], Tensor]]] = [] if per_param_norms else None
    with torch.no_grad():
        for device in devices:
            flags[device] = torch.zeros((), dtype=torch.float32, device=device)
            device_inv_scale = inv_scales.get(device) if inv_scales else None
            if grads.counted.get(device):
                if per_param is None:
                    norms.append(norm_and_check(grads.counted[device], device_inv_scale, flags[device]))
                else:
                    total, per = norm_and_check(grads.counted[device], device_inv_scale, flags[device], per_tensor=True)
                    norms.append(total)
                    per_param.append((grads.counted_params.get(device, []), per))
            if grads.duplicates.get(device):  # replicas: read for inf/nan, counted on another rank
                if per_param is None:
                    norm_and_check(grads.duplicates[device], None, flags[device])
                else:
                    _, per = norm_and_check(grads.duplicates[device], device_inv_scale, flags[device], per_tensor=True)
                    per_param.append((grads.duplicate_params.get(device, []), per))
        if not norms:
            total_norm = torch.zeros((), dtype=torch.float32, device=home)
        elif len(norms) == 1:
            total_norm = norms[0].to(home, non_blocking=True)
        else:
            total_norm = torch.stack([n.to(home, non_blocking=True) for n in norms]).norm()
        if not flags:
            found_inf = torch.zeros((), dtype=torch.float32, device=home)
        elif len(flags) == 1:
            found_inf = next(iter(flags.values())).to(home, non_blocking=True)
        else:
            found_inf = torch.stack([f.to(home, non_blocking=True) for f in flags.values()]).amax()
        if grads.crosses_ranks and extra is not None:
            total_norm, found_inf, extra = reduce_across_ranks(total_norm, found_inf, grads.group, extra)
        elif grads.crosses_ranks:
            total_norm, found_inf = reduce_across_ranks(total_norm, found_inf, grads.group)
        if error_if_nonfinite:
            _raise_if_nonfinite(total_norm)
        coef = ops.clip_coef(total_norm, float(max_norm)).float() if clipping_enabled(max_norm) else None
        if coef is None:
            factor = inv_scale
        else:
            factor = coef if inv_scale is None else inv_scale * coef
    per_device = {d: (found_inf if d == found_inf.device else found_inf.to(d, non_blocking=True)) for d in flags}
    return ClipResult(total_norm, found_inf, per_device, coef, factor, per_param, extra)
