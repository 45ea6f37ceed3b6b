"""The real fp16 path of the Hugging Face integration: transformers.Trainer(fp16=True) on a GPU, where
Accelerate builds its stock GradScaler. Skipped without a GPU or without transformers/accelerate."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from accelerate.state import AcceleratorState  # noqa: E402

from fastamp import GradScaler  # noqa: E402
from fastamp.integrations import apply_fastamp  # noqa: E402


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=320, seq=16, vocab=64):
        g = torch.Generator().manual_seed(0)
        self.ids = (torch.randint(0, vocab, (n, 1), generator=g) + torch.arange(seq)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run(tmp_path, fastamp, optim):
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=64,
                                                                 n_layer=2, n_head=2))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=8,
                                          learning_rate=3e-3, max_grad_norm=1.0, fp16=True, logging_steps=1,
                                          report_to=[], save_strategy="no", disable_tqdm=True, seed=0, optim=optim,
                                          logging_nan_inf_filter=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset())
    if fastamp:
        apply_fastamp(trainer)
        assert isinstance(trainer.accelerator.scaler, GradScaler)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return [h["loss"] for h in logs], trainer.accelerator.scaler.get_scale()


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_fp16_trainer_matches_stock(tmp_path, optim):
    stock_losses, stock_scale = run(tmp_path / "stock", False, optim)
    losses, scale = run(tmp_path / "fastamp", True, optim)
    assert scale == stock_scale  # the same overflows, skipped the same way
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(stock_losses), rtol=1e-2, atol=1e-2)


def test_accelerate_fsdp2_clips_with_the_global_norm(tmp_path):
    """Accelerate's FSDP2 (GPU only there), one process per visible GPU, under torchrun."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "fsdp2.json"
    job = os.path.join(os.path.dirname(os.path.abspath(__file__)), "accelerate_fsdp2_job.py")
    env = {**os.environ, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(torch.cuda.device_count()),
                          "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", job, str(out)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-6000:]
    seen = json.loads(out.read_text())
    assert seen["sharded"], seen["scaler"]
    for norm, oracle in zip(seen["norms"], seen["oracles"]):
        assert math.isfinite(oracle) and abs(norm - oracle) <= 1e-5 * oracle
