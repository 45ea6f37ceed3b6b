"""FusedMixedPrecisionTrainer: the mixed-precision training loop, done with fastamp's fused step.

One call of :meth:`FusedMixedPrecisionTrainer.train_step` runs one micro-batch: autocast forward,
scaled backward, and on every ``accumulation_steps``-th call the optimizer phase: fused unscale +
inf/nan check + norm + clip (folded into ``fused=True`` optimizers), the optimizer step (skipped on the
device on overflow) and the loss-scale update. Statistics stay on the device and are read in one go
when asked (:meth:`get_training_statistics`, logging in :meth:`fit`), so a step makes no host sync
with a fused optimizer (and one, to decide whether to step, with others).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Union

import torch
from torch import Tensor, nn

from ._batch import Batch, LossFn, compute_loss, to_device
from ._gradients import clip_gradients
from ._metrics import StepHistory, StepTimer, memory_mb, training_statistics
from ._plots import plot_dashboard
from ._precision import autocast_dtype, normalize_precision
from ._schedule import SkipAwareSchedule
from .forensics import OverflowDiagnosis, OverflowWatch, diagnose_overflow_in_run
from .grad_scaler import GradScaler
from .ops import NonFiniteRecord, nonfinite_report
from .spike_guard import SpikeGuard

__all__ = ["FusedMixedPrecisionTrainer", "StepResult"]

class StepResult(Mapping):
    """What one :meth:`FusedMixedPrecisionTrainer.train_step` call reports.

    Values are device tensors until read: ``result["loss"]`` reads that number to the host (a sync on
    a GPU), ``result.tensors`` gives the tensors themselves. Keys: ``loss`` (this micro-batch's
    unscaled loss), ``stepped`` (whether this call ran the optimizer phase), ``step`` (optimizer steps
    so far) and, when ``stepped``: ``skipped`` (the step was skipped for inf/nan), ``grad_norm`` (of the
    unscaled gradients, before clipping) and ``scale`` (the loss scale after the update).
    """

    def __init__(self, tensors: Dict[str, Any]) -> None:
        self.tensors = tensors

    def __getitem__(self, key: str) -> Any:
        value = self.tensors[key]
        if isinstance(value, Tensor):
            return bool(value.item()) if key == "skipped" else value.item()
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return f"StepResult({dict(self)})"


@dataclass(frozen=True)
class _ScalingPlan:
    loss_scaling: str  # "dynamic", "static" or "none"
    init_scale: float
    min_scale: float
    max_scale: float
    guard: bool  # without scaling: skip steps with inf/nan gradients (a scaler pinned at 1)


def _scaling_plan(precision: str, loss_scaling: Union[str, float, None], scale_loss: Optional[bool],
                  skip_nonfinite: bool, init_scale: float, min_scale: float, max_scale: float) -> _ScalingPlan:
    """The trainer's three knobs (``loss_scaling``, ``scale_loss``, ``skip_nonfinite``) resolved in one
    place: scaling is on for fp16 unless ``scale_loss=False`` or ``loss_scaling=None``, and on for bf16/fp32
    only with ``scale_loss=True``; a static scale pins min and max at it; without scaling,
    ``skip_nonfinite`` asks for the guard."""
    scaled = (precision == "fp16") if scale_loss is None else bool(scale_loss)
    if loss_scaling is None or not scaled:
        return _ScalingPlan("none", 1.0, 1.0, 1.0, bool(skip_nonfinite))
    if isinstance(loss_scaling, (int, float)) and not isinstance(loss_scaling, bool):
        if not loss_scaling > 0:
            raise ValueError(f"fastamp.FusedMixedPrecisionTrainer: a static loss scale must be > 0, got {loss_scaling!r}")
        static = float(loss_scaling)
        return _ScalingPlan("static", static, static, static, True)
    if loss_scaling == "static":
        return _ScalingPlan("static", init_scale, init_scale, init_scale, True)
    if loss_scaling == "dynamic":
        return _ScalingPlan("dynamic", init_scale, min_scale, max_scale, True)
    raise ValueError(f"fastamp.FusedMixedPrecisionTrainer: loss_scaling must be 'dynamic', 'static', a number or None, "
                     f"got {loss_scaling!r}")


class FusedMixedPrecisionTrainer:
    """Mixed-precision training loop on :class:`fastamp.GradScaler`.

    Args:
        model: the module; it is not moved: put it on ``device`` first (``device`` defaults to the
            device of its parameters).
        optimizer: any optimizer over the model's parameters. With ``torch.optim.Adam/AdamW/SGD(
            fused=True)`` the unscale and clip are folded into the optimizer step (no host sync).
        precision: ``"fp32"``, ``"fp16"``, ``"bf16"`` or Lightning's ``"32-true"``, ``"16-mixed"``,
            ``"bf16-mixed"``. fp16 and bf16 run the forward under ``torch.autocast``.
        loss_scaling: ``"dynamic"``, ``"static"`` (the scale stays at ``init_scale``; overflowing steps
            are still skipped), a number (a static scale), or ``None`` (no scaling).
        max_grad_norm: clip the gradients' L2 norm to this; ``0`` or ``None`` disables clipping (the
            norm is still computed, in the same pass as the unscale).
        accumulation_steps: micro-batches (``train_step`` calls) per optimizer step; the loss of each
            is divided by it, so the step sees the mean gradient.
        device: where batches go; defaults to the model's device.
        scale_loss: whether to use a loss scaler. ``None`` (default): only for fp16, since bf16 and fp32
            need none; ``True`` forces it for bf16/fp32 too.
        loss_fn: ``loss_fn(model, batch) -> loss``; without it the batch is passed to the model
            (dict: ``model(**batch)``, tuple/list: ``model(*batch)``, else ``model(batch)``) and the loss is
            the output itself, ``output["loss"]`` or ``output.loss``.
        init_scale, growth_factor, backoff_factor, growth_interval, hysteresis, min_scale, max_scale:
            passed to :class:`fastamp.GradScaler`.
        zero_grad_set_to_none: passed to ``optimizer.zero_grad``.
        scaler: a :class:`fastamp.GradScaler` to use instead of building one (e.g.
            :class:`fastamp.distributed.ShardedGradScaler` for FSDP2); the scaling options are then ignored.
        skip_nonfinite: without a loss scaler (bf16, fp32), still skip a step whose gradients hold
            inf/nan, on the device, as fp16 does: the flag comes from the norm pass the clip makes anyway
            (a :class:`fastamp.GradScaler` pinned at scale 1), and with a fused optimizer it goes in as
            ``found_inf`` (no host sync). Skipped steps leave parameters and optimizer state
            bit-identical and are counted with the others. ``False``: the stock behaviour (NaN goes in).
        diagnose_overflows: replay the batch of a skipped step with :func:`fastamp.diagnose_overflow`
            (the first one, then at most one every ``diagnose_every`` steps); the reports are in
            :attr:`overflow_diagnoses` and the statistics. Steps without overflow pay nothing. Where the
            skip is only known later (fused optimizers decide on the device), the batches of the last
            ``diagnose_window`` steps are kept (references to the batches as moved to ``device``, which
            keeps their memory alive: lower it, or turn the diagnosis off, for large batches) and
            diagnosed when the flags are read anyway (logging in :meth:`fit`,
            :meth:`get_training_statistics`); the report says which step it is.
        spike_guard: a :class:`fastamp.SpikeGuard`: skip steps whose unscaled gradient norm (or loss)
            spikes, on the device, as overflows are skipped (bf16/fp32 get the guard scaler for it).
        lr_scheduler: a torch LR scheduler over ``optimizer``, stepped after every taken optimizer step and
            not after a skipped one (overflow, non-finite, spike); with a fused optimizer the schedule runs
            on the device (no host sync) and the scheduler object catches up at the statistics' reads
            (``get_training_statistics``, ``fit``'s logging, ``state_dict``). ``ReduceLROnPlateau`` is refused.
        log_grad_norms: keep each parameter's gradient norm from the clip's pass (:meth:`grad_norms`,
            and ``grad_norms`` in the statistics); no extra pass, no host sync until read.
        stuck_after: warn once (:class:`fastamp.TrainingStuckWarning`) after this many consecutive
            skipped steps, or when a step is skipped with the scale at ``min_scale``.

    Under DDP the gradients are all-reduced only on the last micro-batch of each accumulation window
    (``no_sync()``; FSDP2: ``set_requires_gradient_sync``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: str = "fp16",
        loss_scaling: Union[str, float, None] = "dynamic",
        max_grad_norm: Optional[float] = 1.0,
        accumulation_steps: int = 1,
        device: Union[torch.device, str, None] = None,
        *,
        scale_loss: Optional[bool] = None,
        loss_fn: Optional[LossFn] = None,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        hysteresis: int = 1,
        min_scale: float = 0.0,
        max_scale: float = math.inf,
        zero_grad_set_to_none: bool = True,
        scaler: Optional[GradScaler] = None,
        skip_nonfinite: bool = True,
        diagnose_overflows: bool = True,
        diagnose_every: int = 100,
        diagnose_window: int = 16,
        stuck_after: int = 20,
        spike_guard: Optional[SpikeGuard] = None,
        log_grad_norms: bool = False,
        lr_scheduler: Optional[Any] = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.precision = normalize_precision(precision)
        if int(accumulation_steps) < 1:
            raise ValueError(f"fastamp.FusedMixedPrecisionTrainer: accumulation_steps must be >= 1, got {accumulation_steps!r}")
        self.accumulation_steps = int(accumulation_steps)
        self.max_grad_norm = float(max_grad_norm) if max_grad_norm else 0.0
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.loss_fn = loss_fn
        self.zero_grad_set_to_none = zero_grad_set_to_none

        plan = _scaling_plan(self.precision, loss_scaling, scale_loss, skip_nonfinite, init_scale, min_scale, max_scale)
        self.loss_scaling = plan.loss_scaling
        if scaler is not None:
            # A scaler built by the caller (e.g. fastamp.distributed.ShardedGradScaler with its own settings).
            if not isinstance(scaler, GradScaler):
                raise TypeError(f"fastamp.FusedMixedPrecisionTrainer: scaler must be a fastamp.GradScaler, "
                                f"got {type(scaler).__name__}")
            self.scaler = scaler
            self.loss_scaling = "dynamic" if scaler.is_enabled() else "none"
        elif plan.loss_scaling != "none":
            self.scaler = GradScaler(self.device.type, init_scale=plan.init_scale, growth_factor=growth_factor,
                                     backoff_factor=backoff_factor, growth_interval=growth_interval,
                                     hysteresis=hysteresis, min_scale=plan.min_scale, max_scale=plan.max_scale,
                                     spike_guard=spike_guard)
        else:
            # The non-finite guard: the same fused path (norm + found_inf in one read, skip on the device);
            # a spike guard needs it too (its decision joins found_inf).
            self.scaler = GradScaler.nonfinite_guard(self.device.type, enabled=plan.guard or spike_guard is not None,
                                                     spike_guard=spike_guard)
        if scaler is not None and spike_guard is not None:
            if scaler.spike_guard is not None and scaler.spike_guard is not spike_guard:
                raise ValueError("fastamp.FusedMixedPrecisionTrainer: spike_guard given to both the trainer and its scaler")
            scaler.spike_guard = spike_guard
        self.log_grad_norms = bool(log_grad_norms)
        self.lr_scheduler = lr_scheduler
        self._schedule = SkipAwareSchedule(lr_scheduler, self.scaler) if lr_scheduler is not None else None
        min_scale = plan.min_scale
        self.skip_nonfinite = self.scaler.is_enabled()
        self.diagnose_overflows = bool(diagnose_overflows)
        self.overflow_diagnoses: List[OverflowDiagnosis] = []
        self._watch = OverflowWatch(diagnose_every, stuck_after, min_scale=min_scale if self.loss_scaling == "dynamic"
                                    else 0.0)
        # Batches of steps whose skip is not known on the host yet: (step, scale it ran at, found_inf, batches).
        self._unread_steps: deque = deque(maxlen=max(1, int(diagnose_window)))
        self._window_batches: List[Batch] = []
        self._timer = StepTimer(self.device)
        self.num_steps = 0  # optimizer steps taken or skipped: the name GradScaler.num_steps has too
        self._micro_step = 0
        self._window_start: Any = None
        self._window_loss: Optional[Tensor] = None
        self._window_tokens = 0
        self._reset_history()

    @property
    def step(self) -> int:
        """Deprecated name of :attr:`num_steps`."""
        warnings.warn("FusedMixedPrecisionTrainer.step is now num_steps (the name GradScaler uses)", DeprecationWarning,
                      stacklevel=2)
        return self.num_steps

    def _reset_history(self, restored: Optional[Dict[str, List[Any]]] = None) -> None:
        # Per optimizer step; device tensors until read. ``restored``: already on the host (a checkpoint's).
        self.history = StepHistory(self._timer, restored)

    # ---- one micro-batch ---------------------------------------------------------------------------

    @staticmethod
    def _count_tokens(batch: Batch) -> int:
        if isinstance(batch, Mapping):
            ids = batch.get("input_ids")
            if isinstance(ids, Tensor):
                return ids.numel()
            first = next((v for v in batch.values() if isinstance(v, Tensor)), None)
            return first.shape[0] if first is not None and first.dim() else 0
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
            return batch[0].shape[0] if batch[0].dim() else 1
        if isinstance(batch, Tensor):
            return batch.shape[0] if batch.dim() else 1
        return 0

    def train_step(self, batch: Batch) -> StepResult:
        """Forward and backward on one micro-batch; the optimizer phase on every
        ``accumulation_steps``-th call. No host sync (see the module doc)."""
        self.model.train()
        if self._micro_step == 0:
            self._window_start = self._timer.start()
            self.optimizer.zero_grad(set_to_none=self.zero_grad_set_to_none)
            self._window_loss = None
            self._window_tokens = 0
            self._window_batches = []
        batch = to_device(batch, self.device)
        if self.diagnose_overflows and self.scaler.is_enabled():
            self._window_batches.append(batch)
        self._window_tokens += self._count_tokens(batch)
        dtype = autocast_dtype(self.precision)
        last_micro_step = self._micro_step + 1 == self.accumulation_steps
        with self._gradient_sync(last_micro_step):
            with torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
                loss = compute_loss(self.model, batch, self.loss_fn)
            if loss.dim() != 0:
                raise ValueError(f"fastamp.FusedMixedPrecisionTrainer: the loss must be a scalar, got shape {tuple(loss.shape)}")
            self.scaler.scale(loss.float() / self.accumulation_steps).backward()
        detached = loss.detach().float()
        share = detached / self.accumulation_steps
        self._window_loss = share if self._window_loss is None else self._window_loss + share
        self._micro_step += 1
        result: Dict[str, Any] = {"loss": detached, "stepped": False}
        if self._micro_step == self.accumulation_steps:
            result.update(self._optimizer_phase())
            self._micro_step = 0
        result["step"] = self.num_steps
        return StepResult(result)

    def _gradient_sync(self, sync: bool) -> Any:
        """Data-parallel wrappers reduce gradients only on the last micro-batch of an accumulation window:
        DDP through ``no_sync()``, FSDP2 through ``set_requires_gradient_sync``."""
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        if not sync and isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _optimizer_phase(self) -> Dict[str, Tensor]:
        start = self._timer.start()
        live = self.scaler.get_scale_tensor()
        scale_used = live.clone() if live is not None and self.diagnose_overflows else None
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else math.inf  # inf: norm only, no clip
        folded = self._unscaled_fused_step(max_norm)
        if folded is not None:
            grad_norm = folded
        else:
            grad_norm = self.scaler.clip_grad_norm_(self.optimizer, max_norm, per_param_norms=self.log_grad_norms)
            self.scaler.step(self.optimizer)
        self.scaler.update()
        if self._schedule is not None:  # after taken steps only; fused: on the device, no sync
            self._schedule.after_step(self.scaler.last_step_skipped_if_known() if self.scaler.is_enabled() else False)
        optimizer_time = self._timer.stop(start)
        step_time = self._timer.stop(self._window_start)
        self.num_steps += 1

        found_inf = self.scaler.found_inf
        if found_inf is None:  # no scaler: nothing is skipped
            found_inf = torch.zeros((), device=grad_norm.device)
        live_scale = self.scaler.get_scale_tensor()
        scale = live_scale.clone() if live_scale is not None else torch.ones((), device=grad_norm.device)
        assert self._window_loss is not None
        self.history.record(loss=self._window_loss, grad_norm=grad_norm, scale=scale, found_inf=found_inf,
                            step_time=step_time, optimizer_time=optimizer_time, memory=memory_mb(self.device),
                            tokens=self._window_tokens)
        if scale_used is not None:
            known = self.scaler.last_step_skipped_if_known()  # a non-fused step had to read the flag
            index = self.num_steps - 1  # as in the statistics' overflow_step_indices
            if known is False:
                self._watch.observe(index, False)
            else:  # skipped (then reading the scale costs nothing that matters), or not known yet
                self._unread_steps.append((index, scale_used, found_inf, self._window_batches))
                if known:
                    self._diagnose_unread_steps()
        self._window_batches = []
        return {"stepped": True, "skipped": found_inf.reshape(()) != 0, "grad_norm": grad_norm, "scale": scale}

    def _unscaled_fused_step(self, max_norm: Optional[float]) -> Optional[Tensor]:
        """Without a loss scaler, a fused optimizer still takes the clip as its ``grad_scale`` (one read
        of the grads here, none written); returns the norm, or None when this does not apply."""
        if self.scaler.is_enabled() or not getattr(self.optimizer, "_step_supports_amp_scaling", False):
            return None
        grads = self.scaler.local_grads(self.optimizer)  # global over ranks where they are held across ranks
        if len(grads.by_device) != 1:
            return None
        result = clip_gradients(grads, max_norm)
        if result.coef is None:  # clipping off: a plain step
            self.optimizer.step()
            return result.total_norm
        self.optimizer.grad_scale = result.coef.reciprocal()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.grad_scale
        return result.total_norm

    # ---- overflow forensics ------------------------------------------------------------------------------

    def _diagnose_unread_steps(self) -> None:
        """Read the skipped flags of the steps kept since the last read (one read for all of them, made
        where the host reads anyway), warn if training is stuck, diagnose what the watch asks for."""
        if not self._unread_steps:
            return
        steps = list(self._unread_steps)
        self._unread_steps.clear()
        flags = torch.stack([f.reshape(()).to(self.device) for _, _, f, _ in steps]).tolist()
        scales = torch.stack([s.reshape(()).to(self.device) for _, s, _, _ in steps]).tolist()
        for (step, _, _, batches), skipped, scale in zip(steps, flags, scales):
            if self._watch.observe(step, bool(skipped), scale) and batches:
                self.overflow_diagnoses.append(self._diagnose(step, batches, scale))

    def _diagnose(self, step: int, batches: List[Batch], scale: float) -> OverflowDiagnosis:
        model = self.model.module if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) else self.model
        report = None
        for batch in batches:
            # The trainer's backward runs at scale / accumulation_steps (the loss is a window's share).
            report = diagnose_overflow_in_run(model, batch, loss_fn=self.loss_fn, precision=self.precision,
                                              loss_scale=scale / self.accumulation_steps, device=self.device)
            if report.notes and report.notes[-1].startswith("the replay raised"):
                break
            if report.found:
                break
        assert report is not None
        report.step, report.replayed_at_step = step, self.num_steps
        if not report.found and not report.notes:
            report.notes.append("the overflow did not recur when the batch was replayed (dropout, or data that "
                                "changed since); the step was skipped all the same")
        if step != self.num_steps - 1:
            report.notes.append(f"replayed with the weights after {self.num_steps} steps, not those of step {step}: the "
                                "skip was only known on the host later (fused optimizer)")
        return report

    # ---- loops and reports -----------------------------------------------------------------------------

    def fit(
        self,
        data: Iterable[Batch],
        max_steps: int,
        log_every: int = 10,
        progress: bool = True,
        log: Optional[Callable[[str], None]] = None,
    ) -> Dict[str, Any]:
        """Run ``max_steps`` optimizer steps (``max_steps * accumulation_steps`` micro-batches) over
        ``data``, starting it again when it runs out (a one-shot iterator just ends the run).

        Every ``log_every`` steps the loss, scale and skipped-step count are read (the only host reads)
        and shown on a tqdm progress bar when tqdm is installed and ``progress``, else passed to ``log``
        (default: print) when given or when tqdm is missing. Returns :meth:`get_training_statistics`.
        """
        bar = None
        if progress:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=max_steps, desc=f"fastamp {self.precision}", leave=False)
            except ImportError:
                log = log or print
        target = self.num_steps + max_steps
        iterator = iter(data)
        restarted = False
        while self.num_steps < target:
            try:
                batch = next(iterator)
                restarted = False
            except StopIteration:
                if restarted:
                    break
                iterator, restarted = iter(data), True
                continue
            result = self.train_step(batch)
            if not result.tensors["stepped"]:
                continue
            if bar is not None:
                bar.update(1)
            if self.num_steps % log_every == 0 or self.num_steps == target:
                self._diagnose_unread_steps()
                loss, scale = self.history.last_loss.item(), self.scaler.get_scale()
                skipped = self.scaler.step_counts()["skipped"]
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", scale=f"{scale:g}", skipped=skipped)
                if log is not None:
                    log(f"step {self.num_steps}: loss {loss:.4f} scale {scale:g} skipped {skipped}")
        if bar is not None:
            bar.close()
        return self.get_training_statistics()

    def get_training_statistics(self) -> Dict[str, Any]:
        """Everything the reference notebook's trainer reported, and more (reads the device once).

        Per step: ``loss_values``, ``gradient_norms`` (unscaled, before clipping; ``None`` on skipped
        steps), ``scale_values``, ``skipped``, ``step_times`` and ``optimizer_times`` (seconds),
        ``memory_usage`` (MB: CUDA allocated, or process RSS on CPU), ``tokens``. Totals:
        ``total_steps``, ``successful_steps``, ``overflow_steps``, ``overflow_step_indices``,
        ``scale_updates`` (the scale each time it changed), ``success_rate``, ``overflow_rate``,
        ``avg_step_time``, ``avg_optimizer_time``, ``avg_loss``, ``avg_gradient_norm`` (successful
        steps), ``max_memory_mb``, ``tokens_per_second``.
        """
        self._diagnose_unread_steps()
        if self._schedule is not None:
            self._schedule.sync()
        stats: Dict[str, Any] = {
            "precision": self.precision,
            "loss_scaling": self.loss_scaling,
            "skip_nonfinite": self.skip_nonfinite,
            "accumulation_steps": self.accumulation_steps,
            **training_statistics(self.history.read()),
            "overflow_diagnoses": [d.to_dict() for d in self.overflow_diagnoses],
        }
        if self.device.type == "cuda":
            stats["peak_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 1e6
        if self.scaler.spike_guard is not None:
            stats["spike_steps"] = self.scaler.step_counts()["spikes"]
        if self.log_grad_norms:
            stats["grad_norms"] = self.grad_norms()
        return stats

    def grad_norms(self, depth: Optional[int] = None) -> Dict[str, float]:
        """Each parameter's unscaled gradient norm before clipping at the latest optimizer step (with
        ``log_grad_norms=True``; computed in the clip's pass), ``{name: norm}``, in one host read.
        ``depth`` groups names by their first components (``depth=2``: ``"layers.3"``)."""
        model = self.model.module if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) else self.model
        return self.scaler.grad_norms(model, depth)

    def overflow_report(self) -> List[NonFiniteRecord]:
        """The parameters whose gradients held nan/+inf/-inf at the latest optimizer step, and how many,
        if that step was skipped (``[]`` otherwise). The gradients are kept until the next ``train_step``,
        so call it right after the step that overflowed; it reads the device (a host sync)."""
        if self.scaler.is_enabled() and not self.scaler.last_step_skipped():
            return []
        return nonfinite_report([(name, p.grad) for name, p in self.model.named_parameters()])

    # ---- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Model, optimizer, scaler, step counters, statistics and RNG states, at any point: taken between
        the micro-batches of an accumulation window, it also holds what the window has accumulated (the
        gradients, the loss so far, the tokens), so that training resumes bit-identically. Under
        DDP, the gradients of a window's earlier micro-batches are this rank's own (not yet reduced)."""
        rng: Dict[str, Any] = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if self._schedule is not None:
            self._schedule.sync()
        window = None
        if self._micro_step:
            window = {
                "grads": {name: None if p.grad is None else p.grad.detach().clone()
                          for name, p in self.model.named_parameters()},
                "loss": None if self._window_loss is None else self._window_loss.detach().clone(),
                "tokens": self._window_tokens,
            }
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.num_steps,
            "micro_step": self._micro_step,
            "statistics": self.history.read(),
            "precision": self.precision,
            "rng": rng,
            "window": window,
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; training then continues as if never interrupted."""
        if state.get("precision", self.precision) != self.precision:
            raise ValueError(
                f"checkpoint was trained with precision {state['precision']!r}, this trainer uses {self.precision!r}"
            )
        # Everything that can refuse the checkpoint is checked before anything is restored.
        micro_step, window = int(state.get("micro_step", 0)), state.get("window")
        if micro_step and window is None:
            raise ValueError(
                f"checkpoint was taken after micro-batch {micro_step} of an accumulation window but holds no "
                "accumulated gradients (an older format); resume from a checkpoint taken at a window boundary"
            )
        if window is not None and set(window["grads"]) != {n for n, _ in self.model.named_parameters()}:
            raise ValueError("fastamp.FusedMixedPrecisionTrainer: the checkpoint's accumulated gradients do not match "
                             "this model's parameters")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self._schedule is not None:
            self._schedule.reset()
        self.num_steps = int(state["step"])
        self._micro_step = int(state.get("micro_step", 0))
        if window is not None:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, grad in window["grads"].items():
                    params[name].grad = None if grad is None else grad.to(params[name].device).clone()
            self._window_loss = None if window["loss"] is None else window["loss"].to(self.device)
            self._window_tokens = int(window["tokens"])
            self._window_start = self._timer.start()  # the window's time before the checkpoint is not known
            self._window_batches = []
        self._reset_history(state.get("statistics", {}))
        rng = state.get("rng", {})
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    # ---- plots ------------------------------------------------------------------------------------------

    def plot_dashboard(self, path: str, comparison: Optional[Mapping[str, Mapping[str, Any]]] = None) -> str:
        """Write a 6-panel PNG (see :func:`plot_dashboard`) of this run, with other runs' statistics
        (``{label: get_training_statistics()}``) overlaid and compared when given. Needs matplotlib."""
        runs = {f"fastamp {self.precision}": self.get_training_statistics()}
        runs.update(comparison or {})
        return plot_dashboard(path, runs)
