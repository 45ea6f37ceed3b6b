"""Lightning integration: a precision plugin on fastamp.GradScaler and an AMP monitor callback.

    trainer = L.Trainer(plugins=[FusedMixedPrecision("16-mixed", "cuda")], callbacks=[AMPMonitor()],
                        gradient_clip_val=1.0)

:class:`FusedMixedPrecision` subclasses Lightning's ``MixedPrecision`` plugin: same arguments, same
checkpoint state (a stock plugin's checkpoint resumes with it, and the other way round), and
``gradient_clip_algorithm="norm"`` runs on fastamp's fused ops: the clip of gradients that are still
scaled is fastamp's one-read unscale + inf/nan check + norm, then one write (or, with a ``fused=True``
optimizer, no write at all: the factor goes to the optimizer, which Lightning's own plugin refuses to
clip). Needs ``lightning`` (``pip install fastamp[lightning]``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.core.optimizer import LightningOptimizer
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision
    from lightning.pytorch.utilities import GradClipAlgorithmType
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fastamp.integrations.lightning needs Lightning: pip install 'fastamp[lightning]'") from e

from torch.amp.grad_scaler import OptState

from .. import ops
from .._batch import LossFn
from .._gradients import clip_gradients, local_grads, named_norms
from .._metrics import memory_mb
from .._schedule import SkipAwareSchedule
from ..forensics import OverflowDiagnosis, OverflowWatch, diagnose_overflow_in_run
from ..grad_scaler import GradScaler
from ..spike_guard import SpikeGuard

__all__ = ["AMPMonitor", "FusedMixedPrecision"]

_log = logging.getLogger(__name__)
_STOCK_KEY = "MixedPrecision"  # where Lightning's own plugin keeps the scaler state in a checkpoint


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def _handles_unscaling(optimizer: Any) -> bool:
    return bool(getattr(_unwrap(optimizer), "_step_supports_amp_scaling", False))


class FusedMixedPrecision(MixedPrecision):
    """Lightning's ``MixedPrecision`` plugin on :class:`fastamp.GradScaler` and fused clipping.

    Args:
        precision: ``"16-mixed"`` (loss scaling), ``"bf16-mixed"`` or ``"32-true"`` (no scaling, no autocast).
        device: the autocast device type, ``"cuda"`` or ``"cpu"``.
        scaler: a :class:`fastamp.GradScaler` (or ``torch.amp.GradScaler``) to use; by default a
            ``fastamp.GradScaler`` for 16-mixed built with ``scaler_kwargs``.
        skip_nonfinite: for ``"bf16-mixed"`` and ``"32-true"``: skip, on the device, an optimizer step
            whose gradients hold inf/nan (parameters and optimizer state untouched), as 16-mixed does. Off
            by default, so that the plugin stays a drop-in for the stock one. The check is the norm pass
            of the clip (or, without a clip, one read of the gradients); nothing is written unless clipping.
        spike_guard: a :class:`fastamp.SpikeGuard`: skip, on the device, steps whose gradient norm (or
            loss) spikes (for bf16-mixed / 32-true it brings the guard scaler with it).
        **scaler_kwargs: passed to :class:`fastamp.GradScaler` (``init_scale``, ``growth_interval``,
            ``hysteresis``, ``min_scale``, ...).

    What changes from the stock plugin: the unscale is fastamp's single pass (fp16 and bf16 grads
    accepted); ``gradient_clip_algorithm="norm"`` clips through fastamp (one read + one write, none with
    fused optimizers, whose clipping the stock plugin refuses); in manual optimization
    ``self.clip_gradients`` unscales before clipping (the stock plugin would clip scaled gradients).
    ``on_before_optimizer_step`` sees unscaled gradients, as with the stock plugin (fused optimizers:
    still scaled there, as with the stock plugin).
    """

    def __init__(
        self,
        precision: str = "16-mixed",
        device: str = "cuda",
        scaler: Optional[torch.amp.GradScaler] = None,
        *,
        skip_nonfinite: bool = False,
        spike_guard: Optional[SpikeGuard] = None,
        **scaler_kwargs: Any,
    ) -> None:
        if precision not in ("16-mixed", "bf16-mixed", "32-true"):
            # Lightning's own text first (its tests and users match it), then what fastamp adds.
            raise ValueError(f"`Passed `MixedPrecision(precision={precision!r})`. Precision must be '16-mixed' or "
                             f"'bf16-mixed'. fastamp's FusedMixedPrecision, which stands in for it, also takes '32-true'.")
        if scaler is None and precision == "16-mixed":
            scaler = GradScaler(device, spike_guard=spike_guard, **scaler_kwargs)
        elif spike_guard is not None and isinstance(scaler, GradScaler):
            scaler.spike_guard = spike_guard
        # Lightning's plugin knows only the two mixed precisions; 32-true is bf16-mixed without autocast.
        super().__init__("bf16-mixed" if precision == "32-true" else precision, device, scaler)
        self.precision = precision
        self.skip_nonfinite = (bool(skip_nonfinite) or spike_guard is not None) and precision != "16-mixed"
        if self.skip_nonfinite:
            # The guard: a scaler pinned at 1, so that the clip's norm pass also decides the skip.
            self.scaler = GradScaler.nonfinite_guard(device, spike_guard=spike_guard)
        self.per_param_norms = False  # AMPMonitor(log_grad_norms=True) turns it on
        self._param_norms: Optional[List[Tuple[List[Tensor], Tensor]]] = None
        self.last_grad_norm: Optional[Tensor] = None  # device tensor, before clipping
        self.last_optimizer_time: Optional[float] = None  # seconds, host clock around the optimizer phase
        self._phase_start: Optional[float] = None

    # ---- the optimizer phase ---------------------------------------------------------------------

    def _fastamp_scaler(self) -> Optional[GradScaler]:
        return self.scaler if isinstance(self.scaler, GradScaler) and self.scaler.is_enabled() else None

    def _stage(self, optimizer: Any) -> Optional[OptState]:
        scaler = self._fastamp_scaler()
        return scaler.optimizer_stage(_unwrap(optimizer)) if scaler is not None else None

    def optimizer_step(self, optimizer: Any, model: "pl.LightningModule", closure: Callable[[], Any], **kwargs: Any) -> Any:
        if self.scaler is None:
            self._phase_start = None
            out = super().optimizer_step(optimizer, model=model, closure=_timed(self, closure), **kwargs)
            if self._phase_start is not None:
                self.last_optimizer_time = time.perf_counter() - self._phase_start
            return out
        if isinstance(_unwrap(optimizer), torch.optim.LBFGS):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        self._schedules_count_taken_steps(model)
        closure_result = closure()
        self._phase_start = time.perf_counter()
        skip_unscaling = closure_result is None and model.automatic_optimization
        # The guard's scale is 1: nothing to unscale, and its check comes with the clip's norm (or the step).
        unscale_first = not self.skip_nonfinite and not _handles_unscaling(optimizer)
        if not skip_unscaling and unscale_first and self._stage(optimizer) in (None, OptState.READY):
            # Unscaled before on_before_optimizer_step, as the stock plugin does (one fused pass here).
            self.scaler.unscale_(_unwrap(optimizer))
        self._after_closure(model, optimizer)
        if skip_unscaling:
            return closure_result
        step_output = self.scaler.step(_unwrap(optimizer), **kwargs)
        self.scaler.update()
        self.last_optimizer_time = time.perf_counter() - self._phase_start
        return step_output

    def clip_gradients(
        self,
        optimizer: Any,
        clip_val: Union[int, float] = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        if clip_val > 0 and _handles_unscaling(optimizer) and self.scaler is not None and self._fastamp_scaler() is None:
            # Another scaler cannot fold the clip into a fused optimizer's step; its grads are still
            # scaled here, so clipping them would clip at clip_val / scale. Refuse, as the stock plugin does.
            raise RuntimeError(
                f"The current optimizer, {type(_unwrap(optimizer)).__qualname__}, does not allow for gradient clipping"
                " because it performs unscaling of gradients internally. HINT: Are you using a 'fused' optimizer? "
                f"fastamp: {type(self.scaler).__qualname__} cannot clip a fused optimizer's still-scaled gradients; "
                "fastamp.GradScaler (FusedMixedPrecision's default) folds the clip into the optimizer's step"
            )
        # Lightning's own dispatch (skipping MixedPrecision's refusal of fused optimizers, which fastamp's
        # scaler handles), so that subclasses overriding clip_grad_by_norm/_by_value are honoured.
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)

    def clip_grad_by_norm(self, optimizer: Any, clip_val: Union[int, float]) -> None:
        """Fused: gradients still scaled are unscaled, checked and clipped in one go (folded into fused
        optimizers); unscaled ones take one read for the norm and one write (none on overflow)."""
        raw = _unwrap(optimizer)
        if self._stage(raw) is OptState.READY:
            self.last_grad_norm = self.scaler.clip_grad_norm_(raw, clip_val, per_param_norms=self.per_param_norms)
            self._param_norms = None  # the scaler keeps them
        else:
            self.last_grad_norm = self._clip_unscaled(raw, float(clip_val))

    def grad_norms(self, module: Any, depth: Optional[int] = None) -> Dict[str, float]:
        """``{parameter name: norm}`` of the gradients before clipping at the latest clip by norm (with
        :attr:`per_param_norms` on, as :class:`AMPMonitor` sets it), in one host read."""
        if self._param_norms is None and isinstance(self.scaler, GradScaler):
            return self.scaler.grad_norms(module, depth)
        return named_norms(self._param_norms, module, depth)

    def clip_grad_by_value(self, optimizer: Any, clip_val: Union[int, float]) -> None:
        raw = _unwrap(optimizer)
        if self._stage(raw) is OptState.READY:
            self.scaler.unscale_(raw)
        super().clip_grad_by_value(raw, clip_val)

    def _clip_unscaled(self, optimizer: torch.optim.Optimizer, max_norm: float) -> Tensor:
        """Clip already-unscaled grads: one read for the norm, one write (skipped on overflow)."""
        scaler = self._fastamp_scaler()
        found_inf = scaler.found_inf if scaler is not None else None
        grads = scaler.local_grads(optimizer) if scaler is not None else local_grads(optimizer)
        home = found_inf.device if found_inf is not None else torch.device(self.device)
        result = clip_gradients(grads, max_norm, home=home, per_param_norms=self.per_param_norms)
        self._param_norms = result.per_param
        with torch.no_grad():
            if found_inf is not None:  # the scaler's overflow flag from this iteration's unscale
                result.found_inf_per_device = {d: found_inf.to(d, non_blocking=True) for d in grads.by_device}
            result.apply_(grads, skip_on_found_inf=found_inf is not None)
        return result.total_norm

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        if self.precision == "32-true":
            yield
            return
        with self.autocast_context_manager():
            yield

    # ---- LR schedules: skipped steps do not count ------------------------------------------------------

    def _schedules_count_taken_steps(self, module: Any) -> None:
        """Lightning steps its schedulers after every optimizer step, taken or skipped. Its hook
        ``lr_scheduler_step`` is answered here for step-interval schedulers: they advance after taken
        steps only (fused optimizers: on the device, see fastamp._schedule; the scheduler objects catch
        up at the end of fit and at checkpoints)."""
        scaler = self._fastamp_scaler()
        if scaler is None or getattr(module, "_fastamp_schedules", None) is not None:
            return
        trainer = getattr(module, "_trainer", None)
        configs = [c for c in getattr(trainer, "lr_scheduler_configs", []) if c.interval == "step" and c.frequency == 1]
        schedules = {id(c.scheduler): SkipAwareSchedule(c.scheduler, scaler) for c in configs
                     if not isinstance(c.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)}
        original = module.lr_scheduler_step
        self._schedules = schedules

        def lr_scheduler_step(scheduler: Any, metric: Any) -> None:
            schedule = schedules.get(id(scheduler))
            if schedule is None:
                return original(scheduler, metric)
            schedule.after_step(scaler.last_step_skipped_if_known())

        module.lr_scheduler_step = lr_scheduler_step
        module._fastamp_schedules = schedules

    def _sync_schedules(self) -> None:
        for schedule in getattr(self, "_schedules", {}).values():
            schedule.sync()

    def teardown(self) -> None:
        self._sync_schedules()
        super().teardown()

    # ---- checkpoints: compatible with the stock plugin both ways -----------------------------------

    def state_dict(self) -> Dict[str, Any]:
        self._sync_schedules()  # Lightning saves the schedulers' states around this call
        return super().state_dict()

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # One copy of the scaler state, under the stock plugin's key, so that either plugin resumes from it.
        state = checkpoint.pop(type(self).__qualname__, None) or self.state_dict()
        if state:
            checkpoint[_STOCK_KEY] = state

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # An empty state is a stock bf16 plugin's (no scaler): the guard then starts afresh.
        if type(self).__qualname__ not in checkpoint and checkpoint.get(_STOCK_KEY):
            self.load_state_dict(checkpoint[_STOCK_KEY])


def _timed(plugin: FusedMixedPrecision, closure: Callable[[], Any]) -> Callable[[], Any]:
    """Without a scaler (bf16) the optimizer phase runs inside optimizer.step: time from the closure's end."""

    def run() -> Any:
        result = closure()
        plugin._phase_start = time.perf_counter()
        return result

    return run


class AMPMonitor(Callback):
    """Logs the AMP state every ``log_every_n_steps`` optimizer steps, with no host sync on the others.

    Logged (``amp/...``): ``scale``, ``skipped_steps``, ``grad_norm`` (unscaled, before clipping, when
    the plugin clipped by norm), ``optimizer_ms`` (host time of the optimizer phase) and ``memory_mb``
    (CUDA allocated or process RSS). On an overflow the names of the parameters with nan/inf gradients
    and their counts are logged as a warning and kept in :attr:`overflow_reports`: for every overflow
    when the optimizer is not fused (its step reads the flag anyway), at the logging steps otherwise.

    With ``loss_fn`` (``loss_fn(pl_module, batch) -> loss``), the batch of a skipped step is also replayed
    by :func:`fastamp.diagnose_overflow` (the first overflow, then at most one every ``diagnose_every``
    steps) and the reports kept in :attr:`overflow_diagnoses`: it names the module where the first
    non-finite value arose. It is opt-in because the only loss Lightning knows comes from
    ``training_step``, which may log, count, or (manual optimization) step optimizers, and must not run
    twice. Either way it warns once (:class:`fastamp.TrainingStuckWarning`) after ``stuck_after``
    consecutive skipped steps, or when a step is skipped with the scale at its ``min_scale``.

    ``log_grad_norms=True`` also logs ``grad_norm/<parameter name>`` at the logging steps (grouped by
    the first ``grad_norm_depth`` name components if given): each parameter's norm before clipping,
    from the clip's own pass (``gradient_clip_algorithm="norm"``), one host read per log.
    """

    def __init__(self, log_every_n_steps: int = 50, *, loss_fn: Optional[LossFn] = None, diagnose_every: int = 100,
                 stuck_after: int = 20, log_grad_norms: bool = False, grad_norm_depth: Optional[int] = None) -> None:
        super().__init__()
        self.log_grad_norms, self.grad_norm_depth = bool(log_grad_norms), grad_norm_depth
        self.log_every_n_steps = int(log_every_n_steps)
        self.loss_fn = loss_fn
        self.overflow_reports: List[Tuple[int, List[ops.NonFiniteRecord]]] = []
        self.overflow_diagnoses: List[OverflowDiagnosis] = []
        self.logged: List[Dict[str, float]] = []
        self._diagnose_every, self._stuck_after = int(diagnose_every), int(stuck_after)
        self._watch: Optional[OverflowWatch] = None
        self._scale_before_step: Optional[Tensor] = None

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.log_grad_norms:
            if not hasattr(trainer.precision_plugin, "per_param_norms"):
                raise ValueError("fastamp.AMPMonitor(log_grad_norms=True) needs fastamp's FusedMixedPrecision plugin")
            trainer.precision_plugin.per_param_norms = True

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        scaler = self._scaler(trainer)
        live = scaler.get_scale_tensor() if scaler is not None else None
        self._scale_before_step = live.clone() if live is not None else None  # on the device: no sync

    @staticmethod
    def _scaler(trainer: "pl.Trainer") -> Optional[GradScaler]:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scaler if isinstance(scaler, GradScaler) and scaler.is_enabled() else None

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        scaler = self._scaler(trainer)
        log_now = step > 0 and step % self.log_every_n_steps == 0
        if scaler is not None:
            skipped = scaler.last_step_skipped_if_known()
            if skipped is None and log_now:
                skipped = scaler.last_step_skipped()
            if skipped is not None:
                self._observe(trainer, pl_module, scaler, batch, step, skipped)
            if skipped and (not self.overflow_reports or self.overflow_reports[-1][0] != step):
                report = scaler.overflow_report(pl_module)
                self.overflow_reports.append((step, report))
                _log.warning("fastamp: step %d skipped; non-finite gradients in %s", step,
                             ", ".join(f"{r.name} (nan {r.nan}, +inf {r.posinf}, -inf {r.neginf})" for r in report))
        if not log_now or getattr(self, "_last_logged_step", None) == step:
            return
        self._last_logged_step = step
        plugin = trainer.precision_plugin
        values: Dict[str, float] = {"amp/memory_mb": memory_mb(pl_module.device)}
        if scaler is not None:
            values["amp/scale"] = scaler.get_scale()
            values["amp/skipped_steps"] = float(scaler.step_counts()["skipped"])
        norm = getattr(plugin, "last_grad_norm", None)
        if norm is not None:
            values["amp/grad_norm"] = float(norm)
        optimizer_time = getattr(plugin, "last_optimizer_time", None)
        if optimizer_time is not None:
            values["amp/optimizer_ms"] = optimizer_time * 1e3
        if self.log_grad_norms:  # from the clip's pass; one read, at the logging steps only
            values.update({f"grad_norm/{name}": v for name, v in plugin.grad_norms(pl_module, self.grad_norm_depth).items()})
        self.logged.append({"step": float(step), **values})
        pl_module.log_dict(values, on_step=True, on_epoch=False)

    def _observe(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", scaler: GradScaler, batch: Any,
                 step: int, skipped: bool) -> None:
        """One step's outcome, known on the host: the stuck warning, and the diagnosis of a skipped step."""
        if self._watch is None:
            self._watch = OverflowWatch(self._diagnose_every, self._stuck_after, min_scale=scaler.get_min_scale())
        if self._scale_before_step is None or trainer.global_step == 0:
            return
        scale = float(self._scale_before_step) if skipped else None  # read only when skipped
        if not self._watch.observe(step - 1, skipped, scale) or self.loss_fn is None:
            return
        precision = str(trainer.precision_plugin.precision)
        report = diagnose_overflow_in_run(pl_module, batch, loss_fn=self.loss_fn, precision=precision, loss_scale=scale,
                                          device=pl_module.device)
        report.step, report.replayed_at_step = step - 1, step
        self.overflow_diagnoses.append(report)
        _log.warning("fastamp: %s", report)
