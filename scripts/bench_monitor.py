"""Cost of the entropy monitor: training throughput with monitoring off, on at the default
interval, and on every step, measured side by side (interleaved rounds) in one run.

    python scripts/bench_monitor.py                  # tiny model, CPU
    python scripts/bench_monitor.py --model small --steps 200 --rounds 3

Targets (issue 4): default interval >= 0.98x the throughput with monitoring off;
every step at most 1.3x the step time. The real Lightning loop runs, with the real
callback and a real (offline) W&B logger, so logging and image costs are included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from mha_lightning.config import MonitorConfig
from mha_lightning.data import SyntheticDataModule
from mha_lightning.loggers import wandb_logger
from mha_lightning.model import Seq2SeqTransformer
from mha_lightning.module import Seq2SeqModule
from mha_lightning.monitor.callback import EntropyMonitor

MODELS = {
    "tiny": dict(d_model=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, ffn_dim=128),
    "small": dict(d_model=256, num_heads=8, num_encoder_layers=3, num_decoder_layers=3, ffn_dim=512),
}


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._t)


def run_once(args, every_n_steps: int | None, workdir: Path) -> tuple[float, int]:
    """-> (mean step seconds after warmup, target tokens per step)."""
    L.seed_everything(0, workers=True)
    data = SyntheticDataModule(
        task="reverse",
        vocab_size=32,
        min_len=args.seq_len,
        max_len=args.seq_len,
        num_train=args.batch_size * (args.steps + 10),
        num_val=64,
        num_test=64,
        batch_size=args.batch_size,
    )
    model = Seq2SeqTransformer(vocab_size=32, dropout=0.0, **MODELS[args.model])
    module = Seq2SeqModule(model, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    timer = StepTimer()
    callbacks = [timer]
    if every_n_steps is not None:
        config = MonitorConfig(every_n_steps=every_n_steps, render_plots=False, probe=False)
        callbacks.append(EntropyMonitor(config, output_dir=str(workdir)))
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=args.steps,
        limit_val_batches=0,
        logger=wandb_logger(offline=True, save_dir=str(workdir), project="bench"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        inference_mode=False,
        log_every_n_steps=50,
    )
    trainer.fit(module, datamodule=data)
    import wandb

    wandb.finish()
    measured = timer.times[args.warmup :]
    return statistics.fmean(measured), args.batch_size * (args.seq_len + 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=24)
    p.add_argument("--every-n-steps", type=int, default=50, help="the default interval (conf/monitor)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    modes = {"off": None, f"every {args.every_n_steps}": args.every_n_steps, "every step": 1}
    times: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):  # interleaved, so machine noise hits every mode alike
            for name, n in modes.items():
                step, tokens = run_once(args, n, Path(tmp) / f"{r}_{name.replace(' ', '_')}")
                times[name].append(step)
    base = statistics.median(times["off"])
    results = {
        "model": args.model,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "rounds": args.rounds,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "modes": {},
    }
    print(f"{'monitoring':<14}{'step ms':>10}{'tokens/s':>12}{'throughput vs off':>20}{'step time vs off':>18}")
    for name in modes:
        t = statistics.median(times[name])
        row = {
            "step_ms": 1e3 * t,
            "tokens_per_s": tokens / t,
            "throughput_ratio": base / t,
            "step_time_ratio": t / base,
        }
        results["modes"][name] = row
        print(
            f"{name:<14}{row['step_ms']:>10.2f}{row['tokens_per_s']:>12.0f}{row['throughput_ratio']:>20.3f}"
            f"{row['step_time_ratio']:>18.3f}"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
