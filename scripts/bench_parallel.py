"""What head sharding costs and saves: tp=1 against tp=2, side by side in one run.

    python scripts/bench_parallel.py                               # tiny model, CPU (gloo), tp 1 and 2
    python scripts/bench_parallel.py --model small --steps 30 --batch-size 32 --seq-len 64 --out bench.json
    python scripts/bench_parallel.py --model small --tp 1 2 4      # on a CUDA machine: NCCL, bf16 autocast

Each tensor-parallel size runs in its own spawned world (one process per rank, mesh
(dp=1, tp)), with the package's own `distributed.parallelize`, on the same global batch.
Reported per size:

- step time: median over --steps AdamW steps after --warmup, and tokens/s (source + target);
- per-rank memory, from the local shards: parameters and AdamW state (exp_avg, exp_avg_sq,
  step) of the sharded layers (attention q/k/v/o and FFN fc1/fc2), and of the whole model;
- communication per training step (forward, backward, optimizer step), counted by a
  small dispatch mode like `CommDebugMode` that also adds up bytes: collectives and their
  message size (the whole buffer, nccl-tests' convention: the summed
  tensor of an all-reduce, the gathered tensor of an all-gather), and the bytes each rank
  puts on the wire in a ring (2(n-1)/n x message for all-reduce, (n-1)/n for the others);
- on CUDA: model FLOPs utilisation, the package's FLOP formula (``mha_lightning.model.flops``, matmuls
  including attention's) / time / (peak x GPUs).

CPU runs use fp32 (bf16 matmuls on CPU are ~100x slower) and, by default, split the cores
evenly between the ranks, so tp=1 and tp=2 use the same hardware.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mha_lightning.distributed import ParallelConfig
from mha_lightning.distributed.launch import run_local
from mha_lightning.distributed.parallelize import parallelize
from mha_lightning.model import Seq2SeqTransformer
from mha_lightning.model.flops import train_flops

# Mirrors conf/model/{tiny,small}.yaml.
MODELS = {
    "tiny": dict(d_model=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, ffn_dim=128),
    "small": dict(d_model=256, num_heads=8, num_encoder_layers=3, num_decoder_layers=3, ffn_dim=512),
}
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, bf16 dense tensor-core peak
SHARDED = ("self_attn", "cross_attn", "ffn")  # the modules the tensor-parallel plan splits


class CollectiveCounter(TorchDispatchMode):
    """Counts the collectives that run under it, and their message bytes, by op name.

    What CommDebugMode does, plus bytes. CommDebugMode itself cannot be used here: in torch
    2.13 its module tracker raises IndexError when a module runs twice in one forward, and
    the shared token embedding does (source and target)."""

    NAMESPACES = ("_c10d_functional", "c10d_functional", "_c10d_functional_autograd", "c10d")
    KINDS = ("reduce", "gather", "scatter", "all_to_all", "alltoall", "broadcast")  # not wait_tensor, wrap_*

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = defaultdict(int)
        self.message_bytes: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor lower itself to plain collectives first
        name = func._overloadpacket.__name__.strip("_").replace("allreduce", "all_reduce")
        name = name.replace("allgather", "all_gather")
        if func.namespace in self.NAMESPACES and any(kind in name for kind in self.KINDS):
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            self.calls[name] += 1
            self.message_bytes[name] += max((t.numel() * t.element_size() for t in tensors), default=0)
        return func(*args, **kwargs)


def ring_wire_bytes(op: str, message: int, n: int) -> float:
    if n <= 1:
        return 0.0
    return message * (2 * (n - 1) / n if "all_reduce" in op else (n - 1) / n)


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    sharded = [p for name, m in model.named_modules() if name.endswith(SHARDED) for p in m.parameters()]
    state = lambda params: local_bytes(  # noqa: E731
        v for p in params for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)
    )
    params = list(model.parameters())
    return {
        "sharded_param_bytes": local_bytes(sharded),
        "sharded_adamw_state_bytes": state(sharded),
        "param_bytes": local_bytes(params),
        "adamw_state_bytes": state(params),
    }


def worker(mesh, args: argparse.Namespace) -> dict:
    tp, rank = mesh.size(), dist.get_rank()
    cuda = mesh.device_type == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.manual_seed(0)  # same weights and data on every rank and in every world
    model = Seq2SeqTransformer(
        vocab_size=args.vocab_size, dropout=0.0, max_len=max(256, args.seq_len + 1), **MODELS[args.model]
    ).to(device)
    parallelize(model, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, S = args.batch_size, args.seq_len
    src = torch.randint(4, args.vocab_size, (B, S), device=device)
    tgt = torch.randint(4, args.vocab_size, (B, S + 1), device=device)

    phases = {
        "forward": contextlib.nullcontext,
        "backward": contextlib.nullcontext,
        "optimizer": contextlib.nullcontext,
    }

    def step() -> None:
        with phases["forward"](), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(src, tgt[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tgt[:, 1:].flatten())
        with phases["backward"]():
            loss.backward()
        with phases["optimizer"]():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    counters = {phase: CollectiveCounter() for phase in phases}
    phases.update({phase: (lambda c=c: c) for phase, c in counters.items()})
    step()  # one counted step, outside the timing
    phases.update({phase: contextlib.nullcontext for phase in phases})
    sync()
    dist.barrier()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)

    step_s = statistics.median(times)
    tokens = B * (S + S)  # source + target tokens per step
    result = {
        "tp": tp,
        "rank": rank,
        "threads": torch.get_num_threads() if not cuda else None,
        "step_ms_median": 1e3 * step_s,
        "step_ms_min": 1e3 * min(times),
        "tokens_per_s": tokens / step_s,
        **memory_report(model, optimizer),
        "collectives": {phase: dict(c.calls) for phase, c in counters.items()},
        "message_bytes": {phase: dict(c.message_bytes) for phase, c in counters.items()},
    }
    result["collectives_per_step"] = sum(sum(c.values()) for c in result["collectives"].values())
    result["message_bytes_per_step"] = sum(sum(b.values()) for b in result["message_bytes"].values())
    result["wire_bytes_per_step"] = sum(
        ring_wire_bytes(op, b, tp) for phase in result["message_bytes"].values() for op, b in phase.items()
    )
    peak = args.peak_tflops if args.peak_tflops is not None else (H100_BF16_DENSE_TFLOPS if cuda else None)
    if peak:
        flops = train_flops(model.config, B, S, S)
        result["model_tflops_per_step"] = flops / 1e12
        result["mfu"] = flops / step_s / (peak * 1e12 * tp)
    if cuda:
        result["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def run_world(tp: int, args: argparse.Namespace) -> list[dict]:
    threads = None if args.device == "cuda" else (args.threads or max(1, (os.cpu_count() or 1) // tp))
    return run_local(worker, (1, tp), args, backend="nccl" if args.device == "cuda" else "gloo", threads=threads)


ROWS = [  # (label, key, format)
    ("step time, median (ms)", "step_ms_median", "{:.2f}"),
    ("step time, min (ms)", "step_ms_min", "{:.2f}"),
    ("tokens/s (src + tgt)", "tokens_per_s", "{:,.0f}"),
    ("MFU", "mfu", "{:.2%}"),
    ("params, sharded layers / rank (B)", "sharded_param_bytes", "{:,}"),
    ("AdamW state, sharded layers / rank (B)", "sharded_adamw_state_bytes", "{:,}"),
    ("params, whole model / rank (B)", "param_bytes", "{:,}"),
    ("AdamW state, whole model / rank (B)", "adamw_state_bytes", "{:,}"),
    ("CUDA max allocated / rank (B)", "max_memory_allocated_bytes", "{:,}"),
    ("collectives / step", "collectives_per_step", "{:,}"),
    ("collective message bytes / step / rank", "message_bytes_per_step", "{:,}"),
    ("ring wire bytes sent / step / rank", "wire_bytes_per_step", "{:,.0f}"),
]


def table(results: dict[int, dict]) -> str:
    sizes = sorted(results)
    base = results[sizes[0]]
    header = f"{'':42s}" + "".join(f"{f'tp={tp}':>16s}" for tp in sizes)
    header += "".join(f"{f'tp{tp}/tp{sizes[0]}':>12s}" for tp in sizes[1:])
    lines = [header]
    for label, key, fmt in ROWS:
        if key not in base:
            continue
        row = f"{label:42s}" + "".join(f"{fmt.format(results[tp][key]):>16s}" for tp in sizes)
        for tp in sizes[1:]:
            a, b = results[tp][key], base[key]
            row += f"{(f'{a / b:.3f}' if b else 'n/a'):>12s}"
        lines.append(row)
    for tp in sizes:
        for phase in ("forward", "backward", "optimizer"):
            calls = results[tp]["collectives"][phase]
            sizes_b = results[tp]["message_bytes"][phase]
            if calls:
                ops = ", ".join(f"{op} x{n} ({sizes_b[op]:,} B)" for op, n in sorted(calls.items()))
                lines.append(f"tp={tp} {phase}: {ops}")
    lines.append(
        "step-time medians by round (ms): "
        + "; ".join(
            f"tp={tp}: " + ", ".join(f"{m:.1f}" for m in results[tp]["step_ms_median_by_round"]) for tp in sizes
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternating repeats; the fastest is kept")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32, help="source length; target is as long")
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes to compare")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per rank (default: cores / tp)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help=f"per-device peak for MFU (default on CUDA: {H100_BF16_DENSE_TFLOPS}, H100 bf16 dense)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    available = torch.cuda.device_count() if args.device == "cuda" else (os.cpu_count() or 1)
    sizes = [tp for tp in args.tp if tp <= available or args.device == "cpu"]
    skipped = sorted(set(args.tp) - set(sizes))
    if skipped:
        print(f"skipping tp={skipped}: only {available} {args.device} device(s)")
    if not sizes:
        parser.error(f"no tensor-parallel size in {args.tp} fits on {available} {args.device} device(s)")
    for tp in sizes:
        ParallelConfig(tensor_parallel_size=tp, data_parallel_size=1).validate(MODELS[args.model], tp, 1)

    # Sizes alternate round by round, so a burst of load from elsewhere hits both; other
    # programs can only slow a step down, so each size keeps its fastest round.
    results: dict[int, dict] = {}
    medians: dict[int, list[float]] = defaultdict(list)
    for _ in range(args.rounds):
        for tp in sizes:
            ranks = run_world(tp, args)
            medians[tp].append(ranks[0]["step_ms_median"])
            if tp not in results or ranks[0]["step_ms_median"] < results[tp]["step_ms_median"]:
                results[tp] = ranks[0]
                results[tp]["per_rank_param_bytes"] = [r["param_bytes"] for r in ranks]
    for tp in sizes:
        results[tp]["step_ms_median_by_round"] = medians[tp]

    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {os.cpu_count()} cores, gloo, fp32"
    print(
        f"{args.model} model, batch {args.batch_size} x seq {args.seq_len}, {args.steps} timed steps, "
        f"best of {args.rounds} round(s); {device}"
    )
    print(table(results))
    report = {
        "device": device,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": {str(tp): r for tp, r in results.items()},
        "ratios_vs_first": {
            str(tp): {
                key: (results[tp][key] / results[sizes[0]][key] if results[sizes[0]].get(key) else None)
                for _, key, _ in ROWS
                if key in results[tp]
            }
            for tp in sizes[1:]
        },
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
