"""Lightning's ModelParallelStrategy (FSDP2 x TP) with fastamp's plugin, run by torchrun (4 ranks, gloo).

The plugin is given nothing about the layout; its clip norm must be the global one: each step, a
callback computes the fp64 norm of the full gradients (DTensor.full_tensor) before the clip, and the
plugin's norm must match it on every rank. Step 3 holds a NaN in one rank's batch (bf16-mixed with the
non-finite guard): every rank must skip it. Rank 0 writes what it saw to argv[1].
"""

import json
import math
import os
import sys

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastamp.integrations.lightning import FusedMixedPrecision
from fastamp.testing.mesh_layouts import fully_shard_model, make_batch, make_model, tp_plan


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = make_model()

    def configure_model(self):
        tp_plan(self.model, self.device_mesh["tensor_parallel"], replicate_norms=False)
        fully_shard_model(self.model, self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.trainer.global_step == 3 and dist.get_rank() == 3:
            x = x.clone()
            x[-1, -1, -1] = math.nan
        return F.mse_loss(self.model(x).float(), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, foreach=False)


class Oracle(L.Callback):
    def __init__(self):
        self.norms, self.seen, self.skipped = [], [], []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        total = sum(float(g.full_tensor().double().square().sum()) for g in grads)
        self.norms.append(math.sqrt(total))
        self.before = {n: p.detach().full_tensor().clone() for n, p in module.named_parameters()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen.append(float(trainer.precision_plugin.last_grad_norm))
        after = {n: p.detach().full_tensor() for n, p in module.named_parameters()}
        self.skipped.append(all(torch.equal(self.before[n], after[n]) for n in after))


def main():
    torch.manual_seed(0)
    data = [make_batch(i) for i in range(5)]
    oracle = Oracle()
    trainer = L.Trainer(accelerator="cpu", devices=4, strategy=L.pytorch.strategies.ModelParallelStrategy(2, 2),
                        plugins=[FusedMixedPrecision("bf16-mixed", device="cpu", skip_nonfinite=True)],
                        gradient_clip_val=0.05, gradient_clip_algorithm="norm", max_steps=5, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[oracle])
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=None))
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, oracle.seen)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"oracle": oracle.norms, "plugin": oracle.seen, "every_rank": values, "skipped": oracle.skipped}, f)


if __name__ == "__main__":
    main()
    dist.barrier()
    # Leave without C++ static destructors: a torch background thread sometimes aborts the process at
    # interpreter teardown ("terminate called without an active exception") after a clean run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
