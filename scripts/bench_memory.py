"""What each sharding technique saves per rank: parameters, gradients, optimizer state, saved activations.

    python scripts/bench_memory.py                 # base (vocab 32000) at tp 1, 2, 4 and large at tp 1, 2
    python scripts/bench_memory.py --quick         # tiny shapes, a few seconds a world (smoke test)
    python scripts/bench_memory.py --device cuda   # on GPUs: also CUDA's peak allocated bytes per rank

Each configuration runs one AdamW training step in its own spawned world (one process per rank, mesh
(dp=1, tp), ``distributed.launch.run_local``), on the same batch of 16 x 64 source and 64 target tokens.
The model is built on the meta device and sharded by the package's own ``distributed.parallelize`` with
the configuration's techniques. Per rank (the largest over the ranks) it counts:

- parameters, gradients and AdamW state (exp_avg, exp_avg_sq, step): bytes of the local shards;
- saved activations: what autograd keeps for backward during the forward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (DTensors by their local shard, each storage once,
  parameters not counted), the gradients the fused loss keeps on its node, and what activation
  checkpointing keeps instead: each checkpointed layer's
  inputs, and under ``selective`` the outputs of the operations its policy keeps
  (``activation_checkpointing.selective_policy``, asked about each op as it runs: an estimate);
- peak resident memory less the rank's own before the model was built (an idle rank's); on CUDA also
  torch's peak allocated bytes.

Targets (reported, never asserted): at tp=2 with sequence and vocabulary parallelism, parameters +
gradients + optimizer state + saved activations <= 0.55x of tp=1 (base, vocab 32000); full activation
checkpointing, saved activations <= 0.25x of none at the same layout; large at tp=2 with peak RSS (less
an idle rank's) <= 0.6x of tp=1. Writes ``bench_out/bench_memory.json`` and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from mha_lightning.distributed import ParallelConfig, collectives
from mha_lightning.distributed.activation_checkpointing import selective_policy
from mha_lightning.distributed.launch import run_local
from mha_lightning.distributed.parallelize import parallelize
from mha_lightning.model import Seq2SeqTransformer

MiB = 2**20
# Mirrors conf/model/{tiny,base,large}.yaml; dropout 0 (it changes no byte counted here).
MODELS = {
    "tiny": dict(d_model=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, ffn_dim=128),
    "base": dict(d_model=512, num_heads=8, num_encoder_layers=6, num_decoder_layers=6, ffn_dim=2048),
    "large": dict(d_model=1024, num_heads=16, num_encoder_layers=6, num_decoder_layers=6, ffn_dim=4096),
}
PLAIN = {"sequence_parallel": False, "vocab_parallel": False}
# (label, model, tp, parallel options)
CONFIGS = [
    ("base tp=1", "base", 1, {}),
    ("base tp=1 AC full", "base", 1, {"activation_checkpointing": "full"}),
    ("base tp=1 AC selective", "base", 1, {"activation_checkpointing": "selective"}),
    ("base tp=2 plain TP", "base", 2, PLAIN),
    ("base tp=2 +SP", "base", 2, {"vocab_parallel": False}),
    ("base tp=2 +VP", "base", 2, {"sequence_parallel": False}),
    ("base tp=2 SP+VP", "base", 2, {}),
    ("base tp=2 SP+VP AC full", "base", 2, {"activation_checkpointing": "full"}),
    ("base tp=2 SP+VP AC selective", "base", 2, {"activation_checkpointing": "selective"}),
    ("base tp=4 plain TP", "base", 4, PLAIN),
    ("base tp=4 SP+VP", "base", 4, {}),
    ("large tp=1", "large", 1, {}),
    ("large tp=2 SP+VP", "large", 2, {}),
]
QUICK = [
    ("tiny tp=1", "tiny", 1, {}),
    ("tiny tp=1 AC full", "tiny", 1, {"activation_checkpointing": "full"}),
    ("tiny tp=2 plain TP", "tiny", 2, PLAIN),
    ("tiny tp=2 SP+VP", "tiny", 2, {}),
    ("tiny tp=2 SP+VP AC full", "tiny", 2, {"activation_checkpointing": "full"}),
]


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def nbytes(tensors) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    storage = local(t).untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class KeptBySelective(TorchDispatchMode):
    """Bytes of the outputs selective checkpointing keeps, estimated by asking its policy
    (``activation_checkpointing.selective_policy``, a fresh one per layer) about each local op of a
    checkpointed layer's forward and counting the outputs it would keep, each storage once."""

    def __init__(self, kept: dict) -> None:
        super().__init__()
        self.kept, self.policy = kept, None
        self.ctx = SimpleNamespace(is_recompute=False)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor lowers itself to local ops first
        out = func(*args, **(kwargs or {}))
        if self.policy is not None and self.policy(self.ctx, func, *args) == CheckpointPolicy.MUST_SAVE:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if type(t) is torch.Tensor:  # not the fake tensors DTensor propagates shapes with
                    self.kept[storage_key(t)] = True
        return out


def worker(mesh, name: str, model_name: str, options: dict, args: dict) -> dict:
    tp = mesh.size()
    device = torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device("cpu")
    idle_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    config = {**MODELS[model_name], "vocab_size": args["vocab_size"], "share_embeddings": False, "max_len": 256}
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Seq2SeqTransformer(**config)
    parallel = ParallelConfig(tensor_parallel_size=tp, data_parallel_size=1, **options)
    parallelize(model, mesh, parallel).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    g = torch.Generator().manual_seed(1)
    B, S = args["batch"], args["seq_len"]
    src = torch.randint(4, config["vocab_size"], (B, S), generator=g).to(device)
    tgt = torch.randint(4, config["vocab_size"], (B, S + 1), generator=g).to(device)
    params = {storage_key(p) for p in model.parameters()}
    saved: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key not in params:
            saved[key] = True
        return t

    checkpointed = parallel.activation_checkpointing != "none"
    mode = KeptBySelective(saved)
    hooks = []
    if checkpointed:
        for layer in [*model.encoder_layers, *model.decoder_layers]:

            def enter(module, layer_args, layer_kwargs):
                for t in [*layer_args, *layer_kwargs.values()]:
                    if isinstance(t, torch.Tensor):  # what checkpointing keeps for the layer: its inputs
                        saved[storage_key(t)] = True
                if parallel.activation_checkpointing == "selective":
                    mode.policy = selective_policy()

            def leave(module, layer_args, output):
                mode.policy = None

            hooks += [layer.register_forward_pre_hook(enter, with_kwargs=True), layer.register_forward_hook(leave)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode:
        loss, _ = model.teacher_forced_loss(src, tgt[:, :-1], tgt[:, 1:], 0.1)
    for hook in hooks:
        hook.remove()
    # The fused loss keeps its gradients (hidden states', this rank's rows of the output weight's) on its
    # autograd node instead of saved tensors: what autograd would otherwise keep, the logits.
    fused = [t for t in getattr(loss.grad_fn, "grads", None) or () if isinstance(t, torch.Tensor)]
    saved_bytes = sum(size for (_, size) in saved) + nbytes(fused)
    loss.backward()
    collectives.reduce_partial_grads(model.parameters())
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    out = {
        "name": name,
        "model": model_name,
        "tp": tp,
        "options": options,
        "params_bytes": nbytes(model.parameters()),
        "grads_bytes": nbytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer_bytes": nbytes(state),
        "saved_activation_bytes": saved_bytes,
        "peak_rss_above_idle_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - idle_rss,
        "step_s": seconds,
        "loss": loss.item(),
    }
    out["total_bytes"] = sum(
        out[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "saved_activation_bytes")
    )
    if device.type == "cuda":
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def largest(ranks: list[dict]) -> dict:
    """The rank with the most bytes in total (they differ only where shards are uneven)."""
    return max(ranks, key=lambda r: r["total_bytes"])


def targets(results: dict[str, dict], quick: bool) -> list[dict]:
    model = "tiny" if quick else "base"
    found = []

    def ratio(label, a, b, key, bar):
        if a in results and b in results:
            value = results[a][key] / results[b][key]
            found.append({"target": label, "value": value, "bar": bar, "met": value <= bar})

    ratio(
        f"{model} tp=2 SP+VP vs tp=1: params+grads+optimizer+saved",
        f"{model} tp=2 SP+VP",
        f"{model} tp=1",
        "total_bytes",
        0.55,
    )
    ratio(
        f"{model} tp=1 AC full vs none: saved activations",
        f"{model} tp=1 AC full",
        f"{model} tp=1",
        "saved_activation_bytes",
        0.25,
    )
    ratio(
        f"{model} tp=2 SP+VP AC full vs none: saved activations",
        f"{model} tp=2 SP+VP AC full",
        f"{model} tp=2 SP+VP",
        "saved_activation_bytes",
        0.25,
    )
    ratio(
        "large tp=2 SP+VP vs tp=1: peak RSS above idle",
        "large tp=2 SP+VP",
        "large tp=1",
        "peak_rss_above_idle_bytes",
        0.6,
    )
    return found


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    parts = [
        ("params_bytes", "parameters"),
        ("grads_bytes", "gradients"),
        ("optimizer_bytes", "AdamW state"),
        ("saved_activation_bytes", "saved activations"),
    ]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.5))
    left = [0.0] * len(names)
    for key, label in parts:
        widths = [results[n][key] / MiB for n in names]
        ax.barh(names, widths, left=left, label=label)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("MiB per rank (the largest rank)")
    ax.set_title("Per-rank memory of one training step, by technique")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--vocab-size", type=int, default=None, help="default 32000 (1000 with --quick)")
    parser.add_argument(
        "--only", nargs="*", default=None, help="run only the configurations whose name contains one of these"
    )
    parser.add_argument("--out", type=Path, default=Path("bench_out/bench_memory.json"))
    args = parser.parse_args(argv)
    configs = QUICK if args.quick else CONFIGS
    if args.only:
        configs = [c for c in configs if any(part in c[0] for part in args.only)]
    shape = {
        "vocab_size": args.vocab_size or (1000 if args.quick else 32000),
        "batch": 16,
        "seq_len": 16 if args.quick else 64,
    }
    backend = "nccl" if args.device == "cuda" else "gloo"
    results = {}
    for name, model_name, tp, options in configs:
        if args.device == "cuda" and tp > torch.cuda.device_count():
            print(f"skipping {name}: {torch.cuda.device_count()} GPU(s)")
            continue
        ranks = run_local(worker, (1, tp), name, model_name, options, shape, backend=backend)
        results[name] = largest(ranks)
        r = results[name]
        print(
            f"{name:32s} params {r['params_bytes'] / MiB:8.1f}  grads {r['grads_bytes'] / MiB:8.1f}  "
            f"adamw {r['optimizer_bytes'] / MiB:8.1f}  saved {r['saved_activation_bytes'] / MiB:8.1f}  "
            f"total {r['total_bytes'] / MiB:8.1f} MiB  "
            f"peak RSS above idle {r['peak_rss_above_idle_bytes'] / MiB:8.1f} MiB",
            flush=True,
        )
    report = {"shape": shape, "device": args.device, "results": results, "targets": targets(results, args.quick)}
    for t in report["targets"]:
        print(f"target: {t['target']}: {t['value']:.3f} (bar {t['bar']}) {'met' if t['met'] else 'NOT met'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
