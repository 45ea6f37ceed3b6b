"""Accelerate with FSDP2 (GPU only in Accelerate) and apply_fastamp, run by torchrun: the clip norm is
the fp64 norm of the full gradients, and fp16's sharded scaler became fastamp's. Rank 0 writes argv[1]."""

import json
import math
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin

from fastamp.distributed import ShardedGradScaler
from fastamp.integrations import apply_fastamp
from fastamp.testing.mesh_layouts import make_batch, make_model

accelerator = Accelerator(mixed_precision="fp16", fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
apply_fastamp(accelerator)
model = make_model()
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
model, opt = accelerator.prepare(model, opt)
norms, oracles = [], []
for step in range(4):
    x, y = (t.to(accelerator.device) for t in make_batch(step))
    opt.zero_grad()
    accelerator.backward(F.mse_loss(model(x).float(), y))
    scale = accelerator.scaler.get_scale()
    oracles.append(math.sqrt(sum(float(p.grad.full_tensor().double().square().sum()) for p in model.parameters())) / scale)
    norms.append(float(accelerator.clip_grad_norm_(model.parameters(), 0.1)))
    opt.step()
if accelerator.is_main_process:
    with open(sys.argv[1], "w") as f:
        json.dump({"norms": norms, "oracles": oracles, "scaler": type(accelerator.scaler).__name__,
                   "sharded": isinstance(accelerator.scaler, ShardedGradScaler)}, f)
