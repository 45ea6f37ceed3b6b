"""transformers.Trainer, stock vs ``apply_fastamp(trainer)``: time per step and of the optimizer phase
(Accelerate's ``clip_grad_norm_`` through ``optimizer.step``), on a tiny GPT-2 built from ``GPT2Config``
(no downloads) and a synthetic dataset. The runs alternate (stock, fastamp, stock, ...) so that the
machine's drift hits both alike; the first steps of each run are left out (warm-up).

    python benchmarks/hf_trainer.py --out benchmarks/results/hf-trainer-cpu-2threads.json
    python benchmarks/summarize.py benchmarks/results/hf-trainer-cpu-2threads.json

The JSON has pytest-benchmark's shape, so summarize.py renders it with the other results.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any, Dict, List

import torch
import transformers
from accelerate.state import AcceleratorState
from report import write_report

from fastamp.integrations import apply_fastamp

WARMUP_STEPS = 3


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = (torch.randint(0, vocab, (n, 1), generator=g) + torch.arange(seq)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _Timer(transformers.TrainerCallback):
    """Per-step wall time and optimizer-phase time (the clip is timed by wrapping it)."""

    def __init__(self, sync) -> None:
        self.sync, self.step_times, self.phase_times = sync, [], []
        self._step_start = self._phase_start = None

    def wrap_clip(self, accelerator) -> None:
        clip = accelerator.clip_grad_norm_

        def timed_clip(*args, **kwargs):
            self.sync()
            self._phase_start = time.perf_counter()
            return clip(*args, **kwargs)

        accelerator.clip_grad_norm_ = timed_clip

    def on_step_begin(self, args, state, control, **kwargs):
        self.sync()
        self._step_start = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.sync()
        self.phase_times.append(time.perf_counter() - self._phase_start)

    def on_step_end(self, args, state, control, **kwargs):
        self.sync()
        self.step_times.append(time.perf_counter() - self._step_start)


def run(fastamp: bool, precision: str, device: str, steps: int, optim: str) -> _Timer:
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh accelerator per run, as in HPO trials
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    timer = _Timer(sync)
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-3, max_grad_norm=1.0,
            use_cpu=device == "cpu", bf16=precision == "bf16", fp16=precision == "fp16", logging_steps=10**9,
            report_to=[], save_strategy="no", disable_tqdm=True, seed=0, optim=optim)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_Dataset(8 * steps, 16, 64),
                                       callbacks=[timer])
        if fastamp:
            apply_fastamp(trainer)
        timer.wrap_clip(trainer.accelerator)
        trainer.train()
    return timer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    precisions = ["fp16", "bf16"] if args.device == "cuda" else ["bf16", "fp32"]
    benchmarks: List[Dict[str, Any]] = []
    for precision in precisions:
        for optim in ("adamw_torch", "adamw_torch_fused"):
            times = {name: {"step": [], "phase": []} for name in ("stock", "fastamp")}
            for _ in range(args.repeats):
                for name in ("stock", "fastamp"):
                    timer = run(name == "fastamp", precision, args.device, args.steps, optim)
                    times[name]["step"] += timer.step_times[WARMUP_STEPS:]
                    times[name]["phase"] += timer.phase_times[WARMUP_STEPS:]
            for kind, label in (("step", "hf-trainer-step"), ("phase", "hf-optimizer-phase")):
                group = f"{label}/{precision}/{optim}/{args.device}"
                for name in ("stock", "fastamp"):
                    benchmarks.append({
                        "group": group, "name": f"{group}/{name}", "stats": {"data": times[name][kind]},
                        "extra_info": {"impl": "stock Trainer" if name == "stock" else "apply_fastamp(trainer)",
                                       "role": name, "baseline": name == "stock", "device": args.device,
                                       "torch": torch.__version__, "transformers": transformers.__version__,
                                       "threads": torch.get_num_threads()}})
    write_report(args.out, args.device, benchmarks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
