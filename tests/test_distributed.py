"""fastamp on torch.distributed with 2 CPU processes (gloo): sharded scaler and clip against a
single-process oracle, DDP against stock AMP, FSDP2, and the number of collectives per step."""

from __future__ import annotations

import copy
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastamp
from fastamp.distributed import ShardedGradScaler, clip_grad_norm_
from fastamp.testing.models import build_model, synthetic_batches
from fastamp.trainer import FusedMixedPrecisionTrainer

WORLD = 2
SHAPES = [(10, 7), (13,), (5, 3), (1,)]
SCALE = 2.0**10
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _run_worker(rank: int, fn, rendezvous: str, *args) -> None:
    fn(rank, rendezvous, *args)
    # Leave without running C++ static destructors: a torch background thread sometimes aborts the
    # process at interpreter teardown ("terminate called without an active exception") after a clean run.
    os._exit(0)


def spawn(fn, *args):
    # A rendezvous file rather than a TCP port: no port to collide with another job on the machine.
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_run_worker, args=(fn, os.path.join(tmp, "rendezvous"), *args), nprocs=WORLD, join=True)


def init(rank: int, rendezvous: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)


class CollectiveCounter:
    """Counts torch.distributed collectives issued through the module's functions."""

    NAMES = ["all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast"]

    def __init__(self) -> None:
        self.count = 0
        self._originals = {}

    def __enter__(self):
        for name in self.NAMES:
            original = getattr(dist, name)
            self._originals[name] = original

            def counted(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)


def full_grads(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


def full_params():
    g = torch.Generator().manual_seed(7)
    return [torch.randn(s, generator=g) for s in SHAPES]


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank r's contiguous piece of the flattened tensor (uneven sizes; rank 1 may get nothing)."""
    flat = t.reshape(-1)
    cut = (flat.numel() + 1) // 2
    return (flat[:cut] if rank == 0 else flat[cut:]).clone()


def _sharded_worker(rank: int, rendezvous: str, fused: bool) -> None:
    init(rank, rendezvous)
    try:
        params = [torch.nn.Parameter(shard(p, rank)) for p in full_params()]
        oracle = [torch.nn.Parameter(p) for p in full_params()]
        make_opt = (lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True)) if fused else (
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
        opt, oracle_opt = make_opt(params), make_opt(oracle)
        scaler = ShardedGradScaler("cpu", init_scale=SCALE, growth_interval=1000)
        oracle_scaler = fastamp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
        for s in (scaler, oracle_scaler):
            s.scale(torch.ones(()))
        # step 0: clip with the global norm; step 1: overflow on rank 1 only (clip path);
        # step 2: clean again; step 3: overflow on rank 0 only (unscale_ path, no clip).
        for step, (overflow_rank, clip) in enumerate([(None, True), (1, True), (None, True), (0, False)]):
            grads = full_grads(step)
            current = scaler.get_scale()  # the grads are scaled by the scale of the moment, as in training
            for p, g in zip(params, grads):
                p.grad = shard(g * current, rank)
            for p, g in zip(oracle, grads):
                p.grad = g * current
            if overflow_rank is not None:
                target = params[2] if rank == 0 else params[0]
                if rank == overflow_rank:
                    target.grad.view(-1)[-1] = math.inf
                oracle[0].grad.view(-1)[-1] = math.inf
            before = [p.detach().clone() for p in params]
            with CollectiveCounter() as counter:
                if clip:
                    norm = scaler.clip_grad_norm_(opt, 0.5)
                    oracle_norm = oracle_scaler.clip_grad_norm_(oracle_opt, 0.5)
                    if overflow_rank is None:
                        expected = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]).double())
                        torch.testing.assert_close(norm.double(), expected, rtol=1e-6, atol=0)
                        torch.testing.assert_close(norm, oracle_norm, rtol=1e-6, atol=0)
                else:
                    scaler.unscale_(opt)
                    oracle_scaler.unscale_(oracle_opt)
                scaler.step(opt)
                scaler.update()
            # The decision needs one collective per step: the packed (norm, found_inf) or found_inf alone.
            assert counter.count == 1, (step, counter.count)
            oracle_scaler.step(oracle_opt)
            oracle_scaler.update()
            assert scaler.get_scale() == oracle_scaler.get_scale(), step
            if overflow_rank is not None:
                assert scaler.last_step_skipped()
                for a, b in zip(params, before):
                    assert torch.equal(a.detach(), b)
            for p, q in zip(params, oracle):
                torch.testing.assert_close(p.detach(), shard(q.detach(), rank), rtol=1e-5, atol=1e-6)
        assert scaler.get_scale() == SCALE / 4 and scaler.step_counts()["skipped"] == 2
        # Every rank took the same decisions: the flags agree across ranks.
        flags = [torch.zeros(()) for _ in range(WORLD)]
        dist.all_gather(flags, scaler.found_inf.reshape(()))
        assert flags[0] == flags[1] == 1.0
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fused", [False, True])
def test_sharded_scaler_and_clip_match_a_single_process_run(fused):
    spawn(_sharded_worker, fused)


def _functional_clip_worker(rank: int, rendezvous: str) -> None:
    init(rank, rendezvous)
    try:
        grads = full_grads(0)
        params = [torch.nn.Parameter(torch.zeros(0)) for _ in grads]
        for p, g in zip(params, grads):
            p.data = shard(torch.zeros_like(g), rank)
            p.grad = shard(g, rank)
        with CollectiveCounter() as counter:
            norm = clip_grad_norm_(params, 0.1)
        assert counter.count == 1
        reference = [g.clone() for g in grads]
        ref_params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(ref_params, reference):
            p.grad = g
        expected = torch.nn.utils.clip_grad_norm_(ref_params, 0.1)
        torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p.grad, shard(q.grad, rank), rtol=1e-6, atol=1e-9)
        # A process group other than the world: a group of both ranks gives the same answer.
        group = dist.new_group([0, 1])
        for p, g in zip(params, grads):
            p.grad = shard(g, rank)
        torch.testing.assert_close(clip_grad_norm_(params, 0.1, process_group=group), expected, rtol=1e-6, atol=0)
        # Positional arguments in torch's order are accepted by the drop-in.
        scaler = ShardedGradScaler("cpu", 2.0**10, 0.25, 4.0, 7, True, group)
        assert (scaler.get_backoff_factor(), scaler.get_growth_factor(), scaler.get_growth_interval()) == (0.25, 4.0, 7)
        assert scaler.process_group is group
    finally:
        dist.destroy_process_group()


def test_functional_sharded_clip_and_process_groups():
    spawn(_functional_clip_worker)


def _ddp_worker(rank: int, rendezvous: str, precision: str) -> None:
    init(rank, rendezvous)
    try:
        from fastamp.testing.stock_loop import stock_amp_run

        torch.manual_seed(0)
        base = build_model("tiny", num_layers=1, d_model=32, num_heads=2, vocab_size=64, seq_len=8)
        data = [b for _, b in zip(range(4), synthetic_batches(base.config, 4, seed=rank, num_tokens=32))]
        fused_model = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))
        stock_model = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))
        trainer = FusedMixedPrecisionTrainer(fused_model, torch.optim.AdamW(fused_model.parameters(), lr=1e-2),
                                             precision=precision, max_grad_norm=1e9, init_scale=2.0**8)
        stats = trainer.fit(data, 4, progress=False)
        stock = stock_amp_run(stock_model, torch.optim.AdamW(stock_model.parameters(), lr=1e-2), data, precision,
                               max_grad_norm=1e9)
        for p, q in zip(fused_model.parameters(), stock_model.parameters()):
            if precision == "fp32":
                assert torch.equal(p, q)
            else:
                torch.testing.assert_close(p, q, rtol=2e-2, atol=2e-3)
        tol = 0 if precision == "fp32" else 2e-2
        torch.testing.assert_close(torch.tensor(stats["loss_values"]), torch.tensor(stock["loss_values"]), rtol=tol, atol=tol)
        # Replicas stay identical across ranks.
        flat = torch.cat([p.detach().reshape(-1) for p in fused_model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        assert torch.equal(gathered[0], gathered[1])

        # Accumulation under no_sync: 2 micro-batches of 2 per rank equal 1 batch of 4 per rank.
        acc_model = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))
        one_model = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))
        acc = FusedMixedPrecisionTrainer(acc_model, torch.optim.SGD(acc_model.parameters(), lr=0.5), precision="fp32",
                                         accumulation_steps=2)
        one = FusedMixedPrecisionTrainer(one_model, torch.optim.SGD(one_model.parameters(), lr=0.5), precision="fp32")
        for batch in data[:2]:
            for half in range(2):
                acc.train_step({k: v[2 * half : 2 * half + 2] for k, v in batch.items()})
            one.train_step(batch)
        for p, q in zip(acc_model.parameters(), one_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_ddp_training_matches_stock_amp(precision):
    spawn(_ddp_worker, precision)


def _fsdp2_worker(rank: int, rendezvous: str) -> None:
    init(rank, rendezvous)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        reference = copy.deepcopy(base)
        model = copy.deepcopy(base)
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
        scaler = ShardedGradScaler("cpu", init_scale=SCALE)
        ref_scaler = fastamp.GradScaler("cpu", init_scale=SCALE)
        g = torch.Generator().manual_seed(3)
        x, y = torch.randn(WORLD * 4, 8, generator=g), torch.randn(WORLD * 4, 4, generator=g)
        for step in range(3):
            opt.zero_grad()
            ref_opt.zero_grad()
            mine = slice(4 * rank, 4 * rank + 4)
            scaler.scale(((model(x[mine]) - y[mine]) ** 2).mean()).backward()
            ref_scaler.scale(((reference(x) - y) ** 2).mean()).backward()
            if step == 1 and rank == 1:
                local = next(p for p in model.parameters() if p.grad.to_local().numel()).grad.to_local()
                local.view(-1)[0] = math.inf
            with CollectiveCounter() as counter:
                norm = scaler.clip_grad_norm_(opt, 0.05)
                scaler.step(opt)
                scaler.update()
            assert counter.count == 1
            if step == 1:
                assert scaler.last_step_skipped()
                ref_scaler.update(SCALE / 2)  # the oracle skips too: no step, same backoff
                ref_opt.zero_grad()
                continue
            ref_norm = ref_scaler.clip_grad_norm_(ref_opt, 0.05)
            ref_scaler.step(ref_opt)
            ref_scaler.update()
            torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
        assert scaler.get_scale() == SCALE / 2
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_fsdp2_fully_shard_on_cpu():
    spawn(_fsdp2_worker)
