"""``fastamp check``: is fastamp right on this machine?

Runs, on each asked device, every op's compiled kernel against the pure-PyTorch reference on awkward
inputs (sizes around the chunk and vector boundaries, empty and one-element tensors, hundreds of
tensors, mixed fp32/fp16/bf16 lists, non-contiguous and misaligned views, nan/+inf/-inf at the first
and last element), bit-identical repeat runs of the norm, ``fastamp.GradScaler`` against
``torch.amp.GradScaler`` over a seeded sequence with injected overflows, a skipped step leaving
parameters and optimizer state bit-identical and, on CUDA, a sync-free step and a CUDA-graph capture
and replay of a fused clip + step + update.

It is what ``python -m bitsandbytes`` or ``ds_report`` are to their users: one line per check, a
summary, and an exit code (see :func:`main_exit_code`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import ops
from .._extension import extension_status
from ..grad_scaler import GradScaler
from ..testing import reference
from ..testing.cases import chunk_size, clones, grad_cases, relative_error, same_bits, tolerance

__all__ = ["CheckResult", "CheckReport", "format_report", "main_exit_code", "run_checks"]



@dataclass
class CheckResult:
    """One line of the report."""

    device: str
    name: str
    status: str  # "PASS", "FAIL" or "SKIP"
    max_error: float = 0.0
    seconds: float = 0.0
    detail: str = ""


@dataclass
class CheckReport:
    """All results, and what was installed when they ran."""

    results: List[CheckResult] = field(default_factory=list)
    build: Dict[str, object] = field(default_factory=dict)
    missing_devices: List[str] = field(default_factory=list)

    @property
    def failed(self) -> List[CheckResult]:
        return [r for r in self.results if r.status == "FAIL"]

    def to_dict(self) -> Dict[str, object]:
        return {"results": [asdict(r) for r in self.results], "build": self.build,
                "missing_devices": self.missing_devices, "failed": len(self.failed),
                "passed": sum(r.status == "PASS" for r in self.results),
                "skipped": sum(r.status == "SKIP" for r in self.results)}

    def write_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, default=str)


class CheckFailed(AssertionError):
    """A check found a difference; the message says where."""

    def __init__(self, message: str, error: float = math.inf) -> None:
        super().__init__(message)
        self.error = error


# ---- comparisons -----------------------------------------------------------------------------------


def _max_abs_error(a: Tensor, b: Tensor) -> float:
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not bool(finite.any()):
        return 0.0
    return float((a.double()[finite] - b.double()[finite]).abs().max())


def _expect(ok: bool, message: str, error: float = math.inf) -> None:
    if not ok:
        raise CheckFailed(message, error)


# ---- inputs ----------------------------------------------------------------------------------------


def _scalar(value: float, device: str, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.full((1,), value, dtype=dtype, device=device)


# ---- op checks -------------------------------------------------------------------------------------


def _check_unscale_check(device: str) -> float:
    for case, grads in grad_cases(device):
        for inv in (0.37, 1.0, 2.0**-16):
            ours, theirs = clones(grads), clones(grads)
            f_ours, f_ref = _scalar(0.0, device), _scalar(0.0, device)
            ops.unscale_check_(ours, f_ours, _scalar(inv, device))
            reference.unscale_check_(theirs, f_ref, _scalar(inv, device))
            _expect(same_bits(f_ours, f_ref), f"{case}, inv_scale {inv}: found_inf {f_ours.item()} vs {f_ref.item()}")
            for i, (a, b) in enumerate(zip(ours, theirs)):
                error = _max_abs_error(a, b)
                _expect(same_bits(a, b), f"{case}, inv_scale {inv}, tensor {i} ({a.dtype}): max |diff| {error:.3g}", error)
            fp32 = [i for i, t in enumerate(grads) if t.dtype == torch.float32]
            if fp32:
                stock = clones([grads[i] for i in fp32])
                f_stock = _scalar(0.0, device)
                torch._amp_foreach_non_finite_check_and_unscale_(stock, f_stock, _scalar(inv, device))
                _expect(same_bits(f_stock, _scalar(float(any(not bool(torch.isfinite(grads[i]).all()) for i in fp32)), device)),
                        f"{case}: torch's found_inf disagrees with its input")
                for i, s in zip(fp32, stock):
                    _expect(same_bits(ours[i], s),
                            f"{case}, tensor {i}: differs from torch._amp_foreach_non_finite_check_and_unscale_")
    return 0.0


def _check_grad_norm(device: str) -> float:
    worst = 0.0
    for case, grads in grad_cases(device):
        for inv in (None, 0.37):
            inv_t = None if inv is None else _scalar(inv, device)
            f_ours, f_ref = _scalar(0.0, device), _scalar(0.0, device)
            before = clones(grads)
            total, per = ops.grad_norm(grads, inv_t, f_ours, per_tensor=True)
            ref_total, ref_per = reference.grad_norm(clones(grads), inv_t, f_ref, True)
            _expect(same_bits(f_ours, f_ref), f"{case}: found_inf {f_ours.item()} vs reference {f_ref.item()}")
            _expect(all(same_bits(a, b) for a, b in zip(grads, before)), f"{case}: grad_norm wrote to its input")
            _expect(total.dtype == ref_total.dtype, f"{case}: norm dtype {total.dtype} vs {ref_total.dtype}")
            err = max(relative_error(total, ref_total), relative_error(per, ref_per))
            tol = max(tolerance("grad_norm", device, t.dtype) for t in grads)
            _expect(err <= tol, f"{case}, inv_scale {inv}: relative error {err:.3g} > {tol:g}", err)
            worst = max(worst, err)
    total, per = ops.grad_norm([], None, _scalar(0.0, device), per_tensor=True)
    _expect(float(total) == 0.0 and per.numel() == 0 and total.device.type == device,
            "empty list: norm is not a zero on the device")
    return worst


def _check_norm_repeatable(device: str) -> float:
    g = torch.Generator().manual_seed(7)
    chunk = chunk_size()
    grads = [(torch.randn(n, generator=g) * 30).to(device=device, dtype=dt)
             for n, dt in ((3 * chunk + 11, torch.float32), (chunk * 2, torch.bfloat16), (12345, torch.float16))] * 20
    first, first_per = ops.grad_norm(grads, _scalar(0.5, device), None, per_tensor=True)
    for _ in range(4):
        again, again_per = ops.grad_norm(grads, _scalar(0.5, device), None, per_tensor=True)
        _expect(torch.equal(first, again) and torch.equal(first_per, again_per),
                f"norm changed between runs: {first.item()!r} vs {again.item()!r}")
    return 0.0


def _check_unscale_check_norm(device: str) -> float:
    worst = 0.0
    for case, grads in grad_cases(device):
        ours, theirs = clones(grads), clones(grads)
        f_ours, f_ref = _scalar(0.0, device), _scalar(0.0, device)
        total, per = ops.unscale_check_norm_(ours, f_ours, _scalar(0.25, device), per_tensor=True)
        ref_total, ref_per = reference.unscale_check_norm_(theirs, f_ref, _scalar(0.25, device), True)
        _expect(same_bits(f_ours, f_ref), f"{case}: found_inf {f_ours.item()} vs reference {f_ref.item()}")
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _expect(same_bits(a, b), f"{case}, tensor {i}: unscaled values differ", _max_abs_error(a, b))
        err = max(relative_error(total, ref_total), relative_error(per, ref_per))
        tol = max(tolerance("unscale_check_norm_", device, t.dtype) for t in grads)
        _expect(err <= tol, f"{case}: relative error {err:.3g} > {tol:g}", err)
        worst = max(worst, err)
    return worst


def _check_scale(device: str) -> float:
    for case, grads in grad_cases(device):
        for factor, flag in ((0.3, None), (1.7, 0.0), (0.3, 1.0), (0.5, float("nan"))):
            ours, theirs = clones(grads), clones(grads)
            f = None if flag is None else _scalar(flag, device)
            ops.scale_(ours, _scalar(factor, device), f)
            reference.scale_(theirs, _scalar(factor, device), None if f is None else f.clone())
            for i, (a, b) in enumerate(zip(ours, theirs)):
                _expect(same_bits(a, b), f"{case}, factor {factor}, found_inf {flag}, tensor {i}: max |diff| "
                        f"{_max_abs_error(a, b):.3g}", _max_abs_error(a, b))
            if flag is not None and flag != 0.0:
                _expect(all(same_bits(a, b) for a, b in zip(ours, grads)), f"{case}: found_inf={flag} but tensors changed")
    return 0.0


def _check_clip_coef(device: str) -> float:
    worst = 0.0
    for norm in (0.0, 1e-8, 0.5, 1.0, 3.0, 1e30, math.inf, math.nan):
        for max_norm in (1.0, 0.01, 5.0):
            ours = ops.clip_coef(torch.tensor(norm, device=device), max_norm)
            theirs = reference.clip_coef(torch.tensor(norm, device=device), max_norm, 1e-6)
            err = relative_error(ours, theirs)
            _expect(err <= 1e-7, f"norm {norm}, max_norm {max_norm}: {ours.item()!r} vs {theirs.item()!r}", err)
            worst = max(worst, err)
    return worst


def _check_clip_norm(device: str) -> float:
    """clip_norm's norm, coefficient and factor against the reference (the norm at its tolerance; the
    coefficient and factor of that norm bit for bit)."""
    worst = 0.0
    for case, grads in grad_cases(device):
        grads = [g for g in grads if g.dtype in ops.kernel_dtypes(device)]
        for max_norm in (1e-3, 1e6):
            inv = _scalar(0.5, device)
            total, per, coef, factor = ops.clip_norm(grads, max_norm, inv, _scalar(0.0, device), per_tensor=True)
            ref_total = reference.grad_norm(grads, inv, None, True)[0]
            dtype = reference.norm_dtype(grads)
            err = relative_error(total, ref_total)
            _expect(err <= tolerance("grad_norm", device, dtype) or not math.isfinite(ref_total.item()),
                    f"{case}: norm {total.item()!r} vs {ref_total.item()!r}", err)
            expected_coef = reference.clip_coef(total, max_norm, 1e-6).float()
            _expect(same_bits(coef, expected_coef), f"{case}: coef {coef.item()!r} vs {expected_coef.item()!r}")
            _expect(same_bits(factor, inv.reshape(()) * expected_coef), f"{case}: factor {factor.item()!r}")
            worst = max(worst, err if math.isfinite(err) else 0.0)
    return worst


def _check_update_scale(device: str) -> float:
    g = torch.Generator().manual_seed(3)
    overflows = (torch.rand(300, generator=g) < 0.3).tolist()
    for hysteresis, min_scale, max_scale in ((1, 0.0, math.inf), (3, 1.0, 2.0**20), (2, 2.0**10, 2.0**12)):
        state_ours = [_scalar(2.0**11, device), torch.zeros(1, dtype=torch.int32, device=device),
                      torch.full((1,), hysteresis, dtype=torch.int32, device=device)]
        state_ref = [t.clone() for t in state_ours]
        state_torch = [t.clone() for t in state_ours[:2]]
        for step, overflow in enumerate(overflows):
            found = _scalar(float(overflow), device)
            args = (found, 2.0, 0.5, 3, hysteresis)
            ops.update_scale_(state_ours[0], state_ours[1], *args, state_ours[2], min_scale, max_scale)
            reference.update_scale_(state_ref[0], state_ref[1], *args, state_ref[2], min_scale, max_scale)
            _expect(all(torch.equal(a, b) for a, b in zip(state_ours, state_ref)),
                    f"hysteresis {hysteresis}, step {step}: scale {state_ours[0].item()} vs reference {state_ref[0].item()}")
            if hysteresis == 1 and min_scale == 0.0:
                torch._amp_update_scale_(state_torch[0], state_torch[1], found, 2.0, 0.5, 3)
                _expect(torch.equal(state_torch[0], state_ours[0]) and torch.equal(state_torch[1], state_ours[1]),
                        f"step {step}: scale {state_ours[0].item()} vs torch._amp_update_scale_ {state_torch[0].item()}")
    return 0.0


# ---- scaler checks ---------------------------------------------------------------------------------


def _model(device: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5)).to(device)


def _inputs(device: str, step: int) -> Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 16, generator=g).to(device)


def _run_scaler(scaler_cls: type, device: str, steps: int,
                overflow_steps: Sequence[int]) -> Tuple[List[float], List[int], List[Tensor]]:
    model = _model(device, 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = scaler_cls(device, init_scale=2.0**10, growth_interval=3)
    scales: List[float] = []
    skipped: List[int] = []
    for step in range(steps):
        optimizer.zero_grad()
        scaler.scale(model(_inputs(device, step)).square().mean()).backward()
        if step in overflow_steps:
            grad = list(model.parameters())[step % 4].grad
            grad.view(-1)[step % grad.numel()] = (math.inf, -math.inf, math.nan)[step % 3]
        before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
        if scales[-1] < before:
            skipped.append(step)
    return scales, skipped, [p.detach().clone() for p in model.parameters()]


def _check_grad_scaler_matches_torch(device: str) -> float:
    overflow_steps = (2, 3, 9, 17, 18, 19, 25)
    ours = _run_scaler(GradScaler, device, 30, overflow_steps)
    theirs = _run_scaler(torch.amp.GradScaler, device, 30, overflow_steps)
    _expect(ours[0] == theirs[0], f"scale sequence {ours[0]} vs torch {theirs[0]}")
    _expect(ours[1] == theirs[1], f"skipped steps {ours[1]} vs torch {theirs[1]}")
    for i, (a, b) in enumerate(zip(ours[2], theirs[2])):
        _expect(torch.equal(a, b), f"parameter {i} differs from torch's after 30 steps", _max_abs_error(a, b))
    return 0.0


def _state_snapshot(optimizer: torch.optim.Optimizer) -> List[Tensor]:
    return [v.detach().clone() for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]


def _check_skipped_step_is_bit_identical(device: str) -> float:
    for kind in ("foreach", "fused"):
        model = _model(device, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, **{kind: True})
        scaler = GradScaler(device, init_scale=2.0**8)
        for step in range(3):
            optimizer.zero_grad()
            scaler.scale(model(_inputs(device, step)).square().mean()).backward()
            if step == 2:
                model[0].weight.grad.view(-1)[-1] = math.inf
                params, state = [p.detach().clone() for p in model.parameters()], _state_snapshot(optimizer)
            scaler.clip_grad_norm_(optimizer, 1.0)
            scaler.step(optimizer)
            scaler.update()
        _expect(scaler.last_step_skipped(), f"{kind} AdamW: the overflowing step was not reported as skipped")
        for i, (a, b) in enumerate(zip(params, model.parameters())):
            _expect(torch.equal(a, b), f"{kind} AdamW: parameter {i} changed on a skipped step")
        for i, (a, b) in enumerate(zip(state, _state_snapshot(optimizer))):
            _expect(torch.equal(a, b), f"{kind} AdamW: optimizer state tensor {i} changed on a skipped step")
    return 0.0


def _fused_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: GradScaler) -> None:
    scaler.clip_grad_norm_(optimizer, 1.0)
    scaler.step(optimizer)
    scaler.update()


def _check_sync_free_step(device: str) -> float:
    model = _model(device, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = GradScaler(device)
    x = _inputs(device, 0)
    for warm in range(2):  # first steps create state lazily
        optimizer.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        _fused_step(model, optimizer, scaler)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            optimizer.zero_grad(set_to_none=False)
            scaler.scale(model(x).square().mean()).backward()
            _fused_step(model, optimizer, scaler)
    except RuntimeError as exc:
        raise CheckFailed(f"a host sync on the hot path: {exc}") from exc
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return 0.0


def _check_cuda_graph(device: str) -> float:
    """Capture clip + fused AdamW step + scale update once, replay it, and compare with eager steps."""
    def setup() -> Tuple[torch.nn.Module, torch.optim.Optimizer, GradScaler]:
        model = _model(device, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)
        scaler = GradScaler(device, init_scale=2.0**8, growth_interval=2)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        return model, optimizer, scaler

    g = torch.Generator().manual_seed(5)
    grads = [[(torch.randn(p.shape, generator=g) * 256).to(device) for p in _model("cpu", 3).parameters()] for _ in range(6)]
    grads[3][1].view(-1)[0] = math.inf  # one overflowing step inside the replays

    def load(model: torch.nn.Module, step: int) -> None:
        for p, value in zip(model.parameters(), grads[step]):
            p.grad.copy_(value)

    eager = setup()
    for step in range(6):
        load(eager[0], step)
        _fused_step(*eager)
    graphed = setup()
    load(graphed[0], 0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up step outside the graph: state creation, as torch advises
        _fused_step(*graphed)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    load(graphed[0], 1)
    with torch.cuda.graph(graph):
        _fused_step(*graphed)
    for step in range(2, 6):
        load(graphed[0], step)
        graph.replay()
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(eager[0].parameters(), graphed[0].parameters())):
        _expect(torch.equal(a, b), f"parameter {i}: graph replay differs from eager steps", _max_abs_error(a, b))
    _expect(eager[2].get_scale() == graphed[2].get_scale(),
            f"scale after replays {graphed[2].get_scale()} vs eager {eager[2].get_scale()}")
    return 0.0


OP_CHECKS: Dict[str, Callable[[str], float]] = {
    "unscale_check_": _check_unscale_check,
    "grad_norm": _check_grad_norm,
    "grad_norm repeatable": _check_norm_repeatable,
    "unscale_check_norm_": _check_unscale_check_norm,
    "scale_": _check_scale,
    "clip_coef": _check_clip_coef,
    "clip_norm": _check_clip_norm,
    "update_scale_": _check_update_scale,
}
SCALER_CHECKS: Dict[str, Callable[[str], float]] = {
    "GradScaler == torch.amp.GradScaler (30 steps)": _check_grad_scaler_matches_torch,
    "skipped step leaves params and state": _check_skipped_step_is_bit_identical,
}
CUDA_CHECKS: Dict[str, Callable[[str], float]] = {
    "sync-free fused step": _check_sync_free_step,
    "CUDA graph capture and replay": _check_cuda_graph,
}


def _device_available(device: str) -> bool:
    return device == "cpu" or (device == "cuda" and torch.cuda.is_available())


def _run_one(device: str, name: str, check: Callable[[str], float]) -> CheckResult:
    started = time.perf_counter()
    try:
        error = check(device)
        status, detail = "PASS", ""
    except CheckFailed as exc:
        status, detail, error = "FAIL", str(exc), exc.error
    except Exception as exc:  # a crash in a kernel is a failed check, not a crashed tool
        status, detail, error = "FAIL", f"{type(exc).__name__}: {exc}", math.inf
    return CheckResult(device, name, status, error, time.perf_counter() - started, detail)


def run_checks(devices: Sequence[str] = ("cpu",), progress: Optional[Callable[[CheckResult], None]] = None) -> CheckReport:
    """Run every check on each device in ``devices`` ("cpu", "cuda"); devices not present are listed
    in ``missing_devices``. ``progress`` is called with each result as it is produced."""
    report = CheckReport(build=extension_status())

    def record(result: CheckResult) -> None:
        report.results.append(result)
        if progress is not None:
            progress(result)

    for device in devices:
        if not _device_available(device):
            report.missing_devices.append(device)
            continue
        key = device.upper()
        missing = list(extension_status()["reference_fallback"].get(key, []))
        if missing:
            reason = extension_status()["extension_error"] or f"no {key} kernels were compiled"
            record(CheckResult(device, "compiled kernels in use", "FAIL", math.inf, 0.0,
                               f"{', '.join(missing)} run the reference on {device} ({reason})"))
        else:
            record(CheckResult(device, "compiled kernels in use", "PASS", 0.0, 0.0, extension_status()["kernels"]))
        for name, check in OP_CHECKS.items():
            op = name.split()[0]
            if op in missing:
                record(CheckResult(device, name, "SKIP", 0.0, 0.0, "no kernel: it would compare the reference with itself"))
            else:
                record(_run_one(device, name, check))
        for name, check in SCALER_CHECKS.items():
            record(_run_one(device, name, check))
        if device == "cuda":
            for name, check in CUDA_CHECKS.items():
                record(_run_one(device, name, check))
        if device == "cuda":
            torch.cuda.synchronize()
    return report


def format_result(result: CheckResult) -> str:
    """One report line: status, device, check, max error, time, and what failed."""
    error = "" if result.status == "SKIP" else f"max err {result.max_error:.2g}"
    line = f"{result.status:4}  {result.device:4}  {result.name:46} {error:16} {result.seconds:6.2f} s"
    return line + (f"\n      {result.detail}" if result.detail and result.status != "PASS" else "")


def format_report(report: CheckReport) -> str:
    """The summary lines after the per-check lines."""
    counts = report.to_dict()
    lines = [f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
             f"({sum(r.seconds for r in report.results):.1f} s); kernels: {report.build.get('kernels')}"]
    for device in report.missing_devices:
        lines.append(f"device {device} is not available here")
    return "\n".join(lines)


def main_exit_code(report: CheckReport) -> int:
    """0 when everything passed, 1 on any failure, 2 when an asked device is absent."""
    if report.failed:
        return 1
    if report.missing_devices:
        return 2
    return 0
