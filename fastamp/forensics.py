"""Overflow forensics: which module made a step overflow, and what to do about it.

After an overflow, nearly every parameter upstream of the origin holds non-finite gradients, so the
gradients alone do not point at the cause. :func:`diagnose_overflow` replays the batch once, under the
same autocast, with hooks on every module: the first module (in execution order) whose forward output
is non-finite or, under fp16 autocast, leaves fp16's range; else the loss; else the first module (in
backward order) whose gradient is non-finite at the loss scale. It costs one extra forward and backward
of that batch and nothing on steps that do not overflow (the trainer calls it only on skipped steps).

The replay leaves the model as it found it: parameters and their ``.grad`` (the backward goes through
``torch.autograd.grad``, which writes no ``.grad``), buffers (BatchNorm running statistics), training
modes and the RNG states; every hook is removed even when the model raises. Hooks of your own on the
model's tensors do fire during the replay (a hook that counts its calls sees one more).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ._batch import Batch, LossFn, compute_loss, to_device
from ._precision import autocast_dtype, normalize_precision
from .grad_scaler import GradScaler

__all__ = ["OverflowDiagnosis", "OverflowWatch", "TrainingStuckWarning", "diagnose_overflow", "diagnose_overflow_in_run"]

FP16_MAX = float(torch.finfo(torch.float16).max)
DEFAULT_LOSS_SCALE = 2.0**16


@dataclass
class OverflowDiagnosis:
    """Where the first non-finite (or, under fp16 autocast, out-of-range) value of a replayed step came from.

    Attributes:
        found: whether anything was found; the other fields are empty (``None``/``""``) when not.
        phase: ``"forward"``, ``"loss"`` or ``"backward"``.
        module: the culprit's qualified name as in ``model.named_modules()`` (``""`` for the root).
        module_type: its class name.
        tensor: ``"output"`` (forward), ``"loss"``, ``"grad_input"`` (the gradient the module's backward
            produced for its input), ``"param_grad"`` (for one of its own parameters, named in
            ``parameter``) or ``"grad_output"`` (the gradient arriving at its output, when it was produced
            outside any module).
        dtype: the dtype of that tensor, e.g. ``"torch.float16"``.
        max_abs: the largest magnitude in it (inf or nan allowed).
        recommendation: one sentence on what to change.
        precision, loss_scale: what the replay ran with.
        parameter: for ``"param_grad"``, the parameter's qualified name.
        step: the optimizer step this diagnoses, when a trainer ran it (else ``None``), counted from 0 as
            in the trainer's ``overflow_step_indices``.
        replayed_at_step: how many optimizer steps had been taken when the batch was replayed (its weights
            are those after them): ``step + 1`` when diagnosed at once, more when the skip was only
            known later (fused optimizers).
        notes: anything that qualifies the report (a replay that did not reproduce the overflow).
    """

    found: bool
    phase: str = ""
    module: str = ""
    module_type: str = ""
    tensor: str = ""
    dtype: str = ""
    max_abs: float = math.nan
    recommendation: str = ""
    precision: str = ""
    loss_scale: float = 1.0
    parameter: str = ""
    step: Optional[int] = None
    replayed_at_step: Optional[int] = None
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-friendly dict (non-finite ``max_abs`` as the strings ``"inf"``/``"nan"``)."""
        d = asdict(self)
        if not math.isfinite(self.max_abs):
            d["max_abs"] = str(self.max_abs)
        return d

    def __str__(self) -> str:
        if not self.found:
            return f"no overflow found replaying the batch ({self.precision}, loss scale {self.loss_scale:g})"
        where = f"{self.module or '<root>'} ({self.module_type})"
        what = f"{self.tensor}{' of ' + self.parameter if self.parameter else ''}"
        step = f"step {self.step}: " if self.step is not None else ""
        kind = "beyond fp16's range" if math.isfinite(self.max_abs) else "first non-finite value"
        return (f"{step}{self.phase}, {kind} in {where}: {what} {self.dtype} max |x| = {self.max_abs:g}. "
                f"{self.recommendation}")


def _floating_tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _floating_tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _floating_tensors(v)


def _max_abs(t: Tensor) -> float:
    if t.numel() == 0:
        return 0.0
    t = t.detach()
    if not bool(torch.isfinite(t).all()):
        return math.nan if bool(torch.isnan(t).any()) else math.inf
    return float(t.abs().max())


def _is_bad(max_abs: float, limit: float) -> bool:
    return not math.isfinite(max_abs) or max_abs > limit


class _Recorder:
    """The hooks of one replay and the first culprit they saw."""

    def __init__(self, model: nn.Module, fp16: bool) -> None:
        self.names = {m: n for n, m in model.named_modules()}
        self.forward_limit = FP16_MAX if fp16 else math.inf
        self.forward: Optional[Tuple[str, nn.Module, str, Tensor, float]] = None
        # Backward: events in the order autograd fires them. For each forward tensor, the modules that
        # consumed it (their grad_input) and the one that produced it (its grad_output).
        self.backward: Optional[Tuple[str, nn.Module, str, Tensor, float, str]] = None
        self.consumers: Dict[int, List[nn.Module]] = {}
        self.hooked: List[Tensor] = []  # keeps the ids in `consumers` from being reused during the replay
        self.handles: List[Any] = []

    # forward
    def pre_hook(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        for t in _floating_tensors((args, kwargs)):
            if t.requires_grad:
                self.hooked.append(t)
                self.consumers.setdefault(id(t), []).append(module)
                self.handles.append(t.register_hook(self._input_grad_hook(module, t)))

    def post_hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        for t in _floating_tensors(output):
            if self.forward is None:
                m = _max_abs(t)
                if _is_bad(m, self.forward_limit):
                    self.forward = ("forward", module, "output", t, m)
            if t.requires_grad:
                self.handles.append(t.register_hook(self._output_grad_hook(module, t)))

    # backward
    def _input_grad_hook(self, module: nn.Module, t: Tensor) -> Any:
        key = id(t)

        def hook(grad: Tensor) -> None:
            # Several modules may have consumed t (a child and its parents): the innermost, the last to
            # see it in forward, is the one whose backward produced this gradient.
            if self.backward is None and self.consumers.get(key, [None])[-1] is module:
                m = _max_abs(grad)
                if not math.isfinite(m):
                    self.backward = ("backward", module, "grad_input", grad, m, "")
        return hook

    def _output_grad_hook(self, module: nn.Module, t: Tensor) -> Any:
        key = id(t)
        self.hooked.append(t)

        def hook(grad: Tensor) -> None:
            # A gradient that reaches a module's output was produced by whatever consumed it: a module
            # (its grad_input hook reports it) or, when none did, code outside any module.
            if self.backward is None and key not in self.consumers:
                m = _max_abs(grad)
                if not math.isfinite(m):
                    self.backward = ("backward", module, "grad_output", grad, m, "")
        return hook

    def param_hook(self, owner: nn.Module, name: str) -> Any:
        def hook(grad: Tensor) -> None:
            if self.backward is None:
                m = _max_abs(grad)
                if not math.isfinite(m):
                    self.backward = ("backward", owner, "param_grad", grad, m, name)
        return hook


@contextlib.contextmanager
def _model_restored(model: nn.Module) -> Iterator[None]:
    """Buffers, training modes and RNG states as they were, whatever happens inside."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, training in modes:
            m.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _recommend(diagnosis: OverflowDiagnosis, autocast: Optional[torch.dtype], device_type: str) -> str:
    name = f"`{diagnosis.module or diagnosis.module_type}`"
    if diagnosis.phase == "forward":
        if autocast == torch.float16 and math.isfinite(diagnosis.max_abs):
            return (f"{name} produces values beyond fp16's range ({FP16_MAX:g}): run it outside autocast "
                    f"(`with torch.autocast('{device_type}', enabled=False)` around it, inputs cast "
                    "to float32), normalize or rescale its output, or train in bf16, whose range is fp32's.")
        if autocast == torch.float16:
            return (f"{name}'s output is non-finite under fp16 autocast: run it in fp32 (outside autocast), "
                    "check its inputs, or train in bf16, whose range is fp32's.")
        return (f"{name}'s output is non-finite even without fp16: look at its inputs and weights (learning "
                "rate, initialization, a division or log of zero); the non-finite guard skips such steps.")
    if diagnosis.phase == "loss":
        return ("the loss itself is non-finite while every module's output was finite: compute the loss in "
                "fp32 (outside autocast, e.g. `loss_fn(logits.float(), target)`) and check the targets.")
    scale = diagnosis.loss_scale
    if autocast == torch.float16 and scale > 1:
        suggestion = 2.0 ** math.floor(math.log2(max(scale / 2.0, 1.0)))
        return (f"the gradient at {name} overflows at loss scale {scale:g}: the scaler backs off by itself, but "
                f"if this recurs, cap it (`GradScaler(..., max_scale={suggestion:g})`), use hysteresis, run "
                f"{name} outside autocast, or train in bf16.")
    return (f"{name}'s backward produced non-finite gradients: check it for divisions, logs or square roots "
            "of values near zero, lower the learning rate or clip; the non-finite guard skips such steps.")


def diagnose_overflow(
    model: nn.Module,
    batch: Batch,
    *,
    loss_fn: Optional[LossFn] = None,
    precision: str = "fp16",
    loss_scale: Union[float, GradScaler, None] = None,
    device: Union[torch.device, str, None] = None,
) -> OverflowDiagnosis:
    """Replay one batch with hooks on every module and say where the first non-finite value came from.

    Args:
        model: the module, in the mode it trains in (a DDP/FSDP wrapper: pass its ``.module``).
        batch: one micro-batch, in FusedMixedPrecisionTrainer's batch protocol (a dict goes in as
            ``model(**batch)``; the loss is the output, ``output["loss"]`` or ``output.loss``) or
            ``loss_fn(model, batch) -> loss``.
        precision: ``"fp16"``, ``"bf16"`` or ``"fp32"`` (Lightning's names too): the autocast to replay
            under. Under fp16, forward values beyond fp16's range count as overflows.
        loss_scale: the scale the backward runs at: a number, a :class:`fastamp.GradScaler` (its
            current scale), or ``None``: 2**16 under fp16, 1 otherwise.
        device: where the batch goes; defaults to the device of the model's parameters.

    Returns:
        An :class:`OverflowDiagnosis`; ``found=False`` when the replay stays finite.

    Raises:
        ValueError: the model has no parameters, or the precision is unknown.
        Whatever the model raises on the batch (the model is restored and the hooks removed first).
    """
    precision_name = normalize_precision(precision)
    autocast = autocast_dtype(precision_name)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("fastamp.diagnose_overflow: the model has no parameters that require grad; nothing to diagnose")
    if isinstance(loss_scale, GradScaler):
        loss_scale = loss_scale.get_scale() if loss_scale.is_enabled() else 1.0
    scale = float(loss_scale) if loss_scale is not None else (DEFAULT_LOSS_SCALE if autocast == torch.float16
                                                               else 1.0)
    device = torch.device(device) if device is not None else params[0][1].device
    report = OverflowDiagnosis(found=False, precision=precision_name, loss_scale=scale)

    recorder = _Recorder(model, fp16=autocast == torch.float16)
    owners = {}
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owners[id(p)] = (module, f"{module_name}.{pname}" if module_name else pname)
    hook_handles = []
    with _model_restored(model):
        try:
            for module in model.modules():
                hook_handles.append(module.register_forward_pre_hook(recorder.pre_hook, with_kwargs=True))
                hook_handles.append(module.register_forward_hook(recorder.post_hook, with_kwargs=True))
            for _, p in params:
                owner, qualified = owners[id(p)]
                hook_handles.append(p.register_hook(recorder.param_hook(owner, qualified)))
            batch = to_device(batch, device)
            context = (torch.autocast(device.type, dtype=autocast) if autocast is not None
                       else contextlib.nullcontext())
            with torch.enable_grad():
                with context:
                    loss = compute_loss(model, batch, loss_fn)
                if not isinstance(loss, Tensor) or loss.dim() != 0:
                    raise ValueError(f"fastamp.diagnose_overflow: the loss must be a scalar tensor, got {loss!r:.80}")
                found = recorder.forward
                if found is None:
                    loss_max = _max_abs(loss)
                    if not math.isfinite(loss_max):
                        report.phase, report.module, report.module_type = "loss", "", type(model).__name__
                        report.tensor, report.dtype, report.max_abs = "loss", str(loss.dtype), loss_max
                        report.found = True
                    elif loss.requires_grad:
                        torch.autograd.grad(loss.float() * scale, [p for _, p in params], allow_unused=True)
                        found = recorder.backward
        finally:
            for h in hook_handles + recorder.handles:
                h.remove()
    if found is not None:
        phase, module, tensor, value, max_abs = found[:5]
        report.found = True
        report.phase, report.module, report.module_type = phase, recorder.names.get(module, ""), type(module).__name__
        report.tensor, report.dtype, report.max_abs = tensor, str(value.dtype), max_abs
        report.parameter = found[5] if len(found) > 5 else ""
    if report.found:
        report.recommendation = _recommend(report, autocast, device.type)
    return report


def diagnose_overflow_in_run(model: nn.Module, batch: Batch, **kwargs: Any) -> OverflowDiagnosis:
    """:func:`diagnose_overflow` from inside a training run: a diagnosis must not end the run it
    diagnoses, so whatever the replay raises becomes a report with ``found=False`` and a note (the model
    is restored either way). Same arguments."""
    try:
        return diagnose_overflow(model, batch, **kwargs)
    except Exception as e:  # noqa: BLE001 -- the point of this function
        precision = kwargs.get("precision", "fp16")
        try:
            precision = normalize_precision(precision)
        except ValueError:
            pass
        scale = kwargs.get("loss_scale")
        return OverflowDiagnosis(found=False, precision=str(precision),
                                 loss_scale=float(scale) if isinstance(scale, (int, float)) else None,
                                 notes=[f"the replay raised {type(e).__name__}: {e}"])


class TrainingStuckWarning(UserWarning):
    """Training is not making progress: many consecutive skipped steps, or the loss scale at its floor."""


class OverflowWatch:
    """Decides, from skipped-step flags already on the host, when to diagnose and when to warn.

    Shared by FusedMixedPrecisionTrainer and the Lightning AMPMonitor. :meth:`observe` takes one step's
    outcome (read where the flag was read anyway) and returns whether that step should be diagnosed: the
    first overflow, then at most one every ``diagnose_every`` steps. It warns once
    (:class:`TrainingStuckWarning`) after ``stuck_after`` consecutive skipped steps, or when a step is
    skipped with the scale already at ``min_scale`` (it cannot back off any further).
    """

    def __init__(self, diagnose_every: int = 100, stuck_after: int = 20, min_scale: float = 0.0) -> None:
        if int(diagnose_every) < 1 or int(stuck_after) < 1:
            raise ValueError(f"fastamp.OverflowWatch: diagnose_every and stuck_after must be >= 1, "
                             f"got {diagnose_every}, {stuck_after}")
        self.diagnose_every = int(diagnose_every)
        self.stuck_after = int(stuck_after)
        self.min_scale = float(min_scale)
        self.consecutive_skips = 0
        self.warned = False
        self._last_diagnosed: Optional[int] = None

    def observe(self, step: int, skipped: bool, scale: Optional[float] = None) -> bool:
        """Record step ``step``'s outcome (``scale``: the loss scale it ran at); True if it is to be diagnosed."""
        if not skipped:
            self.consecutive_skips = 0
            return False
        self.consecutive_skips += 1
        if not self.warned:
            message = None
            if self.consecutive_skips >= self.stuck_after:
                message = (f"{self.consecutive_skips} consecutive optimizer steps were skipped for inf/nan "
                           "gradients (last at step {step}): training is stuck")
            elif self.min_scale > 0 and scale is not None and scale <= self.min_scale:
                message = (f"step {{step}} was skipped with the loss scale at min_scale={self.min_scale:g}: it "
                           "cannot back off further, so every overflow from here on is skipped")
            if message is not None:
                self.warned = True
                warnings.warn(message.format(step=step) + "; see the overflow diagnoses for where it comes from",
                              TrainingStuckWarning, stacklevel=3)
        if self._last_diagnosed is None or step - self._last_diagnosed >= self.diagnose_every:
            self._last_diagnosed = step
            return True
        return False
