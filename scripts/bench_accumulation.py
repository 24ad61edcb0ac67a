"""What gradient accumulation costs under FSDP2, and what its two switches save.

    python scripts/bench_accumulation.py                          # small model, dp=2, k=4, CPU (gloo)
    python scripts/bench_accumulation.py --dp 2 --tp 2 --k 4 --steps 6 --out bench.json

One spawned world of dp x tp processes runs, on the same micro-batches, an optimizer step of k
micro-batches three ways (``distributed.accumulation.GradientAccumulation``):

- ``every``: FSDP2 reduce-scatters and reshards after every micro-batch (what it does untold);
- ``defer``: no reduce-scatter before the last micro-batch (``set_requires_gradient_sync(False)``);
- ``defer_keep``: that, and the parameters stay gathered between micro-batches
  (``set_reshard_after_backward(False)``): the package's choice;

and an ordinary step of one micro-batch (``k1``). Reported: the median time of an optimizer step per
mode, and per mode the overhead ratio: time of the k-micro-batch step / (k x the one-micro-batch step), and FSDP2's
all-gathers and reduce-scatters of one step (calls, MiB), counted on rank 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mha_lightning.data.vocab import NUM_SPECIAL, PAD_ID
from mha_lightning.distributed import ParallelConfig
from mha_lightning.distributed.accumulation import GradientAccumulation
from mha_lightning.distributed.launch import run_local
from mha_lightning.distributed.parallelize import parallelize
from mha_lightning.model import Seq2SeqTransformer

MODEL = dict(vocab_size=8000, d_model=256, num_heads=8, num_encoder_layers=3, num_decoder_layers=3, ffn_dim=512)
MODES = {"every": (False, False), "defer": (True, False), "defer_keep": (True, True)}


def micro_batch(rows: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(NUM_SPECIAL, MODEL["vocab_size"], (rows, length), generator=g)
    return {"src": tokens, "tgt_in": tokens, "tgt_out": tokens}


class CollectiveCount:
    """Counts FSDP2's all-gathers and reduce-scatters (calls and bytes) while installed."""

    NAMES = ("all_gather_single", "reduce_scatter_single")

    def __init__(self) -> None:
        self.calls = dict.fromkeys(self.NAMES, 0)
        self.bytes = dict.fromkeys(self.NAMES, 0)
        self._saved = {name: getattr(torch.distributed, name) for name in self.NAMES}
        for name in self.NAMES:
            setattr(torch.distributed, name, self._counting(name))

    def _counting(self, name):
        original = self._saved[name]

        def call(output, input, *args, **kwargs):
            self.calls[name] += 1
            self.bytes[name] += max(output.numel() * output.element_size(), input.numel() * input.element_size())
            return original(output, input, *args, **kwargs)

        return call

    def remove(self) -> None:
        for name, original in self._saved.items():
            setattr(torch.distributed, name, original)


def step(model, optimizer, accumulation, batches, group) -> float:
    """One optimizer step over ``accumulation.k`` micro-batches -> seconds (between barriers)."""
    n = accumulation.k
    torch.distributed.barrier()
    start = time.perf_counter()
    for i in range(n):
        accumulation.begin(model, last=i == n - 1, first=i == 0)
        b = batches[i]
        loss_sum, _ = model.teacher_forced_loss(b["src"], b["tgt_in"], b["tgt_out"], 0.1)
        loss, _ = accumulation.loss(loss_sum, (b["tgt_out"] != PAD_ID).sum(), group)
        loss.backward()
    accumulation.finish(model.parameters())
    optimizer.step()
    optimizer.zero_grad()
    torch.distributed.barrier()
    return time.perf_counter() - start


def worker(mesh, k: int, steps: int, rows: int, length: int) -> dict:
    dp, tp = mesh["data_parallel"].size(), mesh["tensor_parallel"].size()
    torch.manual_seed(0)
    model = parallelize(Seq2SeqTransformer(**MODEL, dropout=0.0), mesh, ParallelConfig(tp, dp))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    group = mesh["data_parallel"].get_group() if dp > 1 else None
    batches = [micro_batch(rows, length, seed) for seed in range(k)]
    modes = {"k1": GradientAccumulation(1)}
    modes.update({mode: GradientAccumulation(k, *switches) for mode, switches in MODES.items()})
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    comm = {}
    for mode, accumulation in modes.items():  # warm-up, counting each mode's collectives once
        counter = CollectiveCount()
        step(model, optimizer, accumulation, batches, group)
        counter.remove()
        comm[mode] = {"calls": counter.calls, "mib": {n: b / 2**20 for n, b in counter.bytes.items()}}
    for _ in range(steps):  # modes interleaved: the machine's load drifts alike for all of them
        for mode, accumulation in modes.items():
            samples[mode].append(step(model, optimizer, accumulation, batches, group))
    return {"times": {mode: statistics.median(t) for mode, t in samples.items()}, "comm": comm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=16, help="examples per micro-batch per dp rank")
    parser.add_argument("--length", type=int, default=24)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = run_local(worker, (args.dp, args.tp), args.k, args.steps, args.rows, args.length)
    times = {mode: max(r["times"][mode] for r in results) for mode in results[0]["times"]}  # the slowest rank
    report = {
        "layout": {"dp": args.dp, "tp": args.tp},
        "k": args.k,
        "step_s": times,
        "collectives_per_step_rank0": results[0]["comm"],
        "overhead_ratio": {mode: times[mode] / (args.k * times["k1"]) for mode in MODES},
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
