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
import os
import resource
import sys
import time
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .grad_scaler import GradScaler
from .gradients import clip_gradients, grads_by_device
from .ops import NonFiniteRecord, nonfinite_report

__all__ = ["FusedMixedPrecisionTrainer", "StepResult", "normalize_precision", "plot_dashboard"]

_PRECISIONS = {
    "fp32": "fp32", "32": "fp32", "32-true": "fp32", "float32": "fp32",
    "fp16": "fp16", "16": "fp16", "16-mixed": "fp16", "float16": "fp16",
    "bf16": "bf16", "bf16-mixed": "bf16", "bfloat16": "bf16",
}
_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

Batch = Union[Mapping, Sequence, Tensor, Any]
LossFn = Callable[[nn.Module, Any], Tensor]


def normalize_precision(precision: str) -> str:
    """``"fp32"``, ``"fp16"`` or ``"bf16"`` for any of their spellings (Lightning's included)."""
    try:
        return _PRECISIONS[str(precision)]
    except KeyError:
        raise ValueError(
            f"unknown precision {precision!r}; use one of {sorted(_PRECISIONS)}"
        ) from None


def _rss_mb() -> float:
    """Current resident memory of this process in MB (host-side, no device work)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        scale = 1.0 if sys.platform == "darwin" else 1024.0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6


def _memory_mb(device: torch.device) -> float:
    """Memory in use, read on the host: CUDA's allocated bytes on a GPU, the process's RSS on CPU."""
    return torch.cuda.memory_allocated(device) / 1e6 if device.type == "cuda" else _rss_mb()


def _read_scalars(tensors: List[Tensor]) -> List[float]:
    """0-dim device tensors as floats, in one read."""
    return torch.stack([t.float().reshape(()) for t in tensors]).tolist() if tensors else []


def _statistics(h: Dict[str, List[Any]]) -> Dict[str, Any]:
    """Totals and averages of a per-step history (the lists of :meth:`FusedMixedPrecisionTrainer._history`);
    gradient norms of skipped steps become None."""
    total = len(h["loss_values"])
    overflow = [i for i, s in enumerate(h["skipped"]) if s]
    norms = [None if s else n for n, s in zip(h["gradient_norms"], h["skipped"])]
    finite_norms = [n for n in norms if n is not None and math.isfinite(n)]
    scale_updates: List[float] = []
    for s in h["scale_values"]:
        if not scale_updates or scale_updates[-1] != s:
            scale_updates.append(s)
    stats: Dict[str, Any] = {
        "total_steps": total,
        "successful_steps": total - len(overflow),
        "overflow_steps": len(overflow),
        "overflow_step_indices": overflow,
        "scale_updates": scale_updates,
        "scale_values": h["scale_values"],
        "gradient_norms": norms,
        "loss_values": h["loss_values"],
        "step_times": h["step_times"],
        "optimizer_times": h["optimizer_times"],
        "memory_usage": h["memory_usage"],
        "tokens": h["tokens"],
        "skipped": h["skipped"],
    }
    if total:
        stats.update(
            success_rate=(total - len(overflow)) / total,
            overflow_rate=len(overflow) / total,
            avg_step_time=sum(h["step_times"]) / total,
            avg_optimizer_time=sum(h["optimizer_times"]) / total,
            avg_loss=sum(h["loss_values"]) / total,
            avg_gradient_norm=sum(finite_norms) / len(finite_norms) if finite_norms else 0.0,
            max_memory_mb=max(h["memory_usage"]) if h["memory_usage"] else 0.0,
            tokens_per_second=sum(h["tokens"]) / sum(h["step_times"]) if sum(h["step_times"]) > 0 else 0.0,
        )
    return stats


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


class _Timer:
    """Elapsed time of a region: CUDA events on a GPU (read later, no sync), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, start: Any) -> Any:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            return (start, end)
        return time.perf_counter() - start

    def seconds(self, records: List[Any]) -> List[float]:
        if not self.cuda:
            return list(records)
        if records:
            records[-1][1].synchronize()
        return [s.elapsed_time(e) / 1e3 for s, e in records]


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
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.precision = normalize_precision(precision)
        if int(accumulation_steps) < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps!r}")
        self.accumulation_steps = int(accumulation_steps)
        self.max_grad_norm = float(max_grad_norm) if max_grad_norm else 0.0
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.loss_fn = loss_fn
        self.zero_grad_set_to_none = zero_grad_set_to_none

        use_scaler = (self.precision == "fp16") if scale_loss is None else bool(scale_loss)
        if loss_scaling is None:
            use_scaler = False
        self.loss_scaling = self._loss_scaling_kind(loss_scaling) if use_scaler else "none"
        if self.loss_scaling == "static":
            static = init_scale if isinstance(loss_scaling, str) else float(loss_scaling)
            init_scale, min_scale, max_scale = static, static, static
        if scaler is not None:
            # A scaler built by the caller (e.g. fastamp.distributed.ShardedGradScaler for FSDP2).
            if not isinstance(scaler, GradScaler):
                raise TypeError(f"scaler must be a fastamp.GradScaler, got {type(scaler).__name__}")
            self.scaler = scaler
            self.loss_scaling = "dynamic" if scaler.is_enabled() else "none"
        else:
            self.scaler = self._make_scaler(use_scaler, init_scale, growth_factor, backoff_factor, growth_interval,
                                            hysteresis, min_scale, max_scale)
        self._timer = _Timer(self.device)
        self.step = 0  # optimizer steps taken or skipped
        self._micro_step = 0
        self._window_start: Any = None
        self._window_loss: Optional[Tensor] = None
        self._window_tokens = 0
        self._reset_history()

    def _make_scaler(self, enabled: bool, init_scale: float, growth_factor: float, backoff_factor: float,
                     growth_interval: int, hysteresis: int, min_scale: float, max_scale: float) -> GradScaler:
        return GradScaler(self.device.type, init_scale=init_scale, growth_factor=growth_factor,
                          backoff_factor=backoff_factor, growth_interval=growth_interval, enabled=enabled,
                          hysteresis=hysteresis, min_scale=min_scale, max_scale=max_scale)

    @staticmethod
    def _loss_scaling_kind(loss_scaling: Union[str, float]) -> str:
        if isinstance(loss_scaling, (int, float)) and not isinstance(loss_scaling, bool):
            if not loss_scaling > 0:
                raise ValueError(f"a static loss scale must be > 0, got {loss_scaling!r}")
            return "static"
        if loss_scaling in ("dynamic", "static"):
            return str(loss_scaling)
        raise ValueError(f"loss_scaling must be 'dynamic', 'static', a number or None, got {loss_scaling!r}")

    def _reset_history(self) -> None:
        # Per optimizer step; device tensors until read.
        self._losses: List[Tensor] = []
        self._grad_norms: List[Tensor] = []
        self._scales: List[Tensor] = []
        self._found_infs: List[Tensor] = []
        self._step_times: List[Any] = []
        self._optimizer_times: List[Any] = []
        self._memory_mb: List[float] = []
        self._tokens: List[int] = []
        # Already read to the host (after load_state_dict).
        self._restored: Dict[str, List[Any]] = {}

    # ---- one micro-batch ---------------------------------------------------------------------------

    def _to_device(self, batch: Batch) -> Batch:
        if isinstance(batch, Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, Mapping):
            return {k: self._to_device(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(v) for v in batch)
        return batch

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

    def _forward(self, batch: Batch) -> Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(self.model, batch)
        if isinstance(batch, Mapping):
            output = self.model(**batch)
        elif isinstance(batch, (list, tuple)):
            output = self.model(*batch)
        else:
            output = self.model(batch)
        if isinstance(output, Tensor):
            return output
        if isinstance(output, Mapping) and "loss" in output:
            return output["loss"]
        if hasattr(output, "loss"):
            return output.loss
        raise TypeError(
            "FusedMixedPrecisionTrainer: the model's output is not a loss tensor, a dict with 'loss' or an "
            f"object with .loss (got {type(output).__name__}); pass loss_fn=..."
        )

    def train_step(self, batch: Batch) -> StepResult:
        """Forward and backward on one micro-batch; the optimizer phase on every
        ``accumulation_steps``-th call. No host sync (see the module doc)."""
        self.model.train()
        if self._micro_step == 0:
            self._window_start = self._timer.start()
            self.optimizer.zero_grad(set_to_none=self.zero_grad_set_to_none)
            self._window_loss = None
            self._window_tokens = 0
        batch = self._to_device(batch)
        self._window_tokens += self._count_tokens(batch)
        dtype = _AUTOCAST_DTYPES.get(self.precision)
        last_micro_step = self._micro_step + 1 == self.accumulation_steps
        with self._gradient_sync(last_micro_step):
            with torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
                loss = self._forward(batch)
            if loss.dim() != 0:
                raise ValueError(f"FusedMixedPrecisionTrainer: the loss must be a scalar, got shape {tuple(loss.shape)}")
            self.scaler.scale(loss.float() / self.accumulation_steps).backward()
        detached = loss.detach().float()
        share = detached / self.accumulation_steps
        self._window_loss = share if self._window_loss is None else self._window_loss + share
        self._micro_step += 1
        result: Dict[str, Any] = {"loss": detached, "stepped": False}
        if self._micro_step == self.accumulation_steps:
            result.update(self._optimizer_phase())
            self._micro_step = 0
        result["step"] = self.step
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
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else math.inf  # inf: norm only, no clip
        folded = self._unscaled_fused_step(max_norm)
        if folded is not None:
            grad_norm = folded
        else:
            grad_norm = self.scaler.clip_grad_norm_(self.optimizer, max_norm)
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self._optimizer_times.append(self._timer.stop(start))
        self._step_times.append(self._timer.stop(self._window_start))
        self.step += 1

        found_inf = self.scaler.found_inf
        if found_inf is None:  # no scaler: nothing is skipped
            found_inf = torch.zeros((), device=grad_norm.device)
        live_scale = self.scaler.get_scale_tensor()
        scale = live_scale.clone() if live_scale is not None else torch.ones((), device=grad_norm.device)
        assert self._window_loss is not None
        self._losses.append(self._window_loss)
        self._grad_norms.append(grad_norm)
        self._scales.append(scale)
        self._found_infs.append(found_inf.reshape(()))
        self._tokens.append(self._window_tokens)
        self._memory_mb.append(_memory_mb(self.device))
        return {"stepped": True, "skipped": found_inf.reshape(()) != 0, "grad_norm": grad_norm, "scale": scale}

    def _unscaled_fused_step(self, max_norm: Optional[float]) -> Optional[Tensor]:
        """Without a loss scaler, a fused optimizer still takes the clip as its ``grad_scale`` (one read
        of the grads here, none written); returns the norm, or None when this does not apply."""
        if self.scaler.is_enabled() or not getattr(self.optimizer, "_step_supports_amp_scaling", False):
            return None
        by_device = grads_by_device(self.optimizer)
        if len(by_device) != 1:
            return None
        # Global over ranks when the scaler is a sharded one (a no-op otherwise).
        result = clip_gradients(by_device, max_norm, reduce=self.scaler.reduce_norm_and_found_inf)
        if result.coef is None:  # clipping off: a plain step
            self.optimizer.step()
            return result.total_norm
        self.optimizer.grad_scale = result.coef.reciprocal()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.grad_scale
        return result.total_norm

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
        target = self.step + max_steps
        iterator = iter(data)
        restarted = False
        while self.step < target:
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
            if self.step % log_every == 0 or self.step == target:
                loss, scale = self._losses[-1].item(), self.scaler.get_scale()
                skipped = self.scaler.step_counts()["skipped"]
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", scale=f"{scale:g}", skipped=skipped)
                if log is not None:
                    log(f"step {self.step}: loss {loss:.4f} scale {scale:g} skipped {skipped}")
        if bar is not None:
            bar.close()
        return self.get_training_statistics()

    def _history(self) -> Dict[str, List[Any]]:
        """Per-step history read to the host (one read per kind of statistic)."""
        fresh = {
            "loss_values": _read_scalars(self._losses),
            "gradient_norms": _read_scalars(self._grad_norms),
            "scale_values": _read_scalars(self._scales),
            "skipped": [v != 0 for v in _read_scalars(self._found_infs)],
            "step_times": self._timer.seconds(self._step_times),
            "optimizer_times": self._timer.seconds(self._optimizer_times),
            "memory_usage": list(self._memory_mb),
            "tokens": list(self._tokens),
        }
        return {k: self._restored.get(k, []) + v for k, v in fresh.items()}

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
        stats: Dict[str, Any] = {
            "precision": self.precision,
            "loss_scaling": self.loss_scaling,
            "accumulation_steps": self.accumulation_steps,
            **_statistics(self._history()),
        }
        if self.device.type == "cuda":
            stats["peak_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 1e6
        return stats

    def overflow_report(self) -> List[NonFiniteRecord]:
        """The parameters whose gradients held nan/+inf/-inf at the latest optimizer step, and how many,
        if that step was skipped (``[]`` otherwise). The gradients are kept until the next ``train_step``,
        so call it right after the step that overflowed; it reads the device (a host sync)."""
        if self.scaler.is_enabled() and not self.scaler.last_step_skipped():
            return []
        return nonfinite_report([(name, p.grad) for name, p in self.model.named_parameters()])

    # ---- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Model, optimizer, scaler, step counters, statistics and RNG states. Take it between optimizer
        steps (a partly accumulated gradient is not saved)."""
        rng: Dict[str, Any] = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "micro_step": self._micro_step,
            "statistics": self._history(),
            "precision": self.precision,
            "rng": rng,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; training then continues as if never interrupted."""
        if state.get("precision", self.precision) != self.precision:
            raise ValueError(
                f"checkpoint was trained with precision {state['precision']!r}, this trainer uses {self.precision!r}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self._micro_step = int(state.get("micro_step", 0))
        self._reset_history()
        self._restored = {k: list(v) for k, v in state.get("statistics", {}).items()}
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


def plot_dashboard(path: str, runs: Mapping[str, Mapping[str, Any]]) -> str:
    """A 6-panel training dashboard as a PNG: loss; loss scale (log) with overflow markers; gradient
    norm; step and optimizer-phase time; memory; and a comparison of the runs (mean step time,
    optimizer-phase time and final loss), e.g. fastamp vs stock or fp16 vs bf16.

    ``runs`` maps a label to :meth:`FusedMixedPrecisionTrainer.get_training_statistics` output (or any
    dict with the same per-step lists). Needs matplotlib (``pip install fastamp[plot]``). Returns ``path``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plot_dashboard needs matplotlib: pip install 'fastamp[plot]'") from e

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    (ax_loss, ax_scale, ax_norm), (ax_time, ax_mem, ax_cmp) = axes
    for label, stats in runs.items():
        steps = list(range(1, len(stats.get("loss_values", [])) + 1))
        ax_loss.plot(steps, stats.get("loss_values", []), label=label)
        scales = stats.get("scale_values", [])
        if scales:
            line = ax_scale.plot(steps[: len(scales)], scales, label=label)[0]
            overflow = stats.get("overflow_step_indices", [])
            ax_scale.scatter([i + 1 for i in overflow], [scales[i] for i in overflow], marker="x",
                             color=line.get_color(), zorder=3)
        norms = [n if n is not None else float("nan") for n in stats.get("gradient_norms", [])]
        ax_norm.plot(steps[: len(norms)], norms, label=label)
        ax_time.plot(steps, [t * 1e3 for t in stats.get("step_times", [])], label=f"{label} step")
        if stats.get("optimizer_times"):
            ax_time.plot(steps, [t * 1e3 for t in stats["optimizer_times"]], linestyle="--",
                         label=f"{label} optimizer phase")
        ax_mem.plot(steps[: len(stats.get("memory_usage", []))], stats.get("memory_usage", []), label=label)
    ax_loss.set(title="loss", xlabel="step")
    ax_scale.set(title="loss scale (x: skipped step)", xlabel="step", yscale="log")
    ax_norm.set(title="gradient norm (unscaled, before clipping)", xlabel="step")
    ax_time.set(title="time per step (ms)", xlabel="step")
    ax_mem.set(title="memory (MB)", xlabel="step")
    for ax in (ax_loss, ax_scale, ax_norm, ax_time, ax_mem):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)

    labels = list(runs)
    if len(labels) > 1:
        width = 0.25
        xs = range(len(labels))
        step_ms = [runs[k].get("avg_step_time", 0.0) * 1e3 for k in labels]
        opt_ms = [runs[k].get("avg_optimizer_time", 0.0) * 1e3 for k in labels]
        ax_cmp.bar([x - width / 2 for x in xs], step_ms, width, label="step ms")
        ax_cmp.bar([x + width / 2 for x in xs], opt_ms, width, label="optimizer phase ms")
        ax_cmp.set_xticks(list(xs), labels, fontsize=8)
        final = [runs[k]["loss_values"][-1] if runs[k].get("loss_values") else float("nan") for k in labels]
        ax_cmp.set_title("comparison (final loss: " + ", ".join(f"{v:.3f}" for v in final) + ")")
        ax_cmp.legend(fontsize=8)
    else:
        ax_cmp.text(0.5, 0.5, "no comparison run given", ha="center", va="center", transform=ax_cmp.transAxes)
        ax_cmp.set_title("comparison")
        ax_cmp.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
