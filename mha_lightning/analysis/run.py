"""Run the analysis on a checkpoint: on one process, or sharded over tensor-parallel ranks.

Everything that needs the model happens here and ends in two files of the output folder:
``results.json`` (statistics, pruning curves, ablations) and ``maps.pt`` (attention maps of a few
examples). ``report.py`` turns them into pictures and ``report.md``. With ``trainer.devices=N`` the
model is sharded N ways over heads, exactly as training shards it (``distributed.parallelize``);
every rank reads all the examples, the heads' numbers are gathered over the ranks, and rank 0
writes the files (docs/design.md, "Analysing heads").
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mha_lightning.analysis.heads import HeadStatistics, measure_heads
from mha_lightning.analysis.pruning import (
    curve_points,
    prunable,
    random_order,
    ranked_heads,
    refine_removable,
    spearman,
)
from mha_lightning.analysis.roles import RoleInputs, head_roles, punctuation_ids
from mha_lightning.analysis.scoring import TaskScorer
from mha_lightning.data.batching import collate
from mha_lightning.errors import ConfigError
from mha_lightning.kinds import ATTENTION_KINDS, Head

RESULTS_FILE = "results.json"
MODEL_KEYS = ("d_model", "num_heads", "head_dim", "num_encoder_layers", "num_decoder_layers", "head_mask")
MAPS_FILE = "maps.pt"


def load(ckpt: str, split: str, examples: int):
    """-> (module with the checkpoint's model, its DataModule, the examples analysed)."""
    from mha_lightning.evaluate import build_datamodule, build_module

    module, info = build_module(ckpt)
    data = build_datamodule(info)
    pairs = data.splits.get(split)
    if not pairs:
        raise ConfigError(f"split={split!r} has no examples in the checkpoint's data; use val or test")
    return module, data, pairs[:examples]


def batches(pairs: list, batch_size: int, first: int) -> Iterator[tuple[dict[str, Tensor], list]]:
    """The ``first`` examples as the opening batch (their maps are kept), the rest length-sorted."""
    head, rest = pairs[:first], sorted(pairs[first:], key=lambda p: len(p[0]) + len(p[1]))
    if head:
        yield collate(head), head
    for start in range(0, len(rest), batch_size):
        chunk = rest[start : start + batch_size]
        yield collate(chunk), chunk


def prune(stats: HeadStatistics, scorer: TaskScorer, masked: list[Head], cfg: dict[str, Any]) -> dict[str, Any]:
    """Pruning curves in three kinds of order, single-head ablations and the heads removable at
    ``tolerance``. Every mask of every curve is scored in one batched call (``TaskScorer.scores``)."""
    order = ranked_heads(stats.importance_norm, skip=masked)
    points = curve_points(len(order), int(cfg["points"]))
    orders = {"importance": order, "entropy": ranked_heads(stats.entropy_norm, descending=True, skip=masked)}
    orders.update({f"random_{seed}": random_order(order, seed) for seed in range(int(cfg["random_orders"]))})
    removed = [list(heads[:k]) for heads in orders.values() for k in points if k > 0]
    ablations = [[order[-1]], [order[0]]]  # the most and the least important head alone
    values = scorer.scores([[], *removed, *ablations])
    baseline, values = values[0], iter(values[1:])
    curves = {name: [baseline if k == 0 else next(values) for k in points] for name in orders}
    most, least = next(values), next(values)
    removable, wide = {}, {}
    for tolerance, counts in ((float(cfg["tolerance"]), removable), (float(cfg["wide_tolerance"]), wide)):
        counts.update({name: prunable(points, curve, baseline, tolerance) for name, curve in curves.items()})
        # The headline number (least important first) to the exact head, between the measured points.
        counts["importance"] = refine_removable(
            lambda ks: scorer.scores([order[:k] for k in ks]), points, curves["importance"], baseline, tolerance
        )
    first = order[: removable["importance"]]  # the heads that can go at the tolerance, by kind
    by_kind = {kind: sum(h.kind == kind for h in first) for kind in ATTENTION_KINDS}
    return {
        "metric": scorer.name,
        "baseline": baseline,
        "tolerance": float(cfg["tolerance"]),
        "points": points,
        "orders": {name: [str(h) for h in heads] for name, heads in orders.items()},
        "curves": curves,
        "removable": removable,
        "wide_tolerance": float(cfg["wide_tolerance"]),
        "removable_wide": wide,
        "removable_by_kind": by_kind,
        "first_removed": [str(h) for h in order[:10]],
        "ablation": {
            "most_important": {"head": str(order[-1]), "metric": most},
            "least_important": {"head": str(order[0]), "metric": least},
        },
    }


def single_heads(stats: HeadStatistics, scorer: TaskScorer, masked: list[Head], with_metric: bool) -> dict[str, Any]:
    """Each head removed alone: the rise in teacher-forced token loss (and the task metric, where asked or
    cheap), and how well each importance ranks the heads as their removal does (Spearman)."""
    heads = ranked_heads(stats.importance, skip=masked)
    losses = scorer.token_losses([[], *[[h] for h in heads]])
    base, rise = losses[0], [loss - losses[0] for loss in losses[1:]]
    value = {
        name: {str(h): float(getattr(stats, name)[h.kind][h.layer][h.head]) for h in heads}
        for name in ("importance", "importance_norm", "entropy_norm")
    }
    out: dict[str, Any] = {"heads": [str(h) for h in heads], "loss": base, "loss_rise": rise}
    out["spearman_loss_rise"] = {name: spearman([v[str(h)] for h in heads], rise) for name, v in value.items()}
    if with_metric or scorer.teacher_forced:
        metric = scorer.scores([[], *[[h] for h in heads]])
        drop = [metric[0] - m for m in metric[1:]]
        out.update(metric=scorer.name, baseline=metric[0], metric_drop=drop)
        out["spearman_metric_drop"] = {name: spearman([v[str(h)] for h in heads], drop) for name, v in value.items()}
    return out


def analyze_model(module, data, pairs: list, cfg: dict[str, Any], *, tp_rank: int = 0, tp_size: int = 1, gather=None):
    """-> (results dict, maps) for a (possibly sharded) module; every rank returns the same numbers."""
    from mha_lightning.distributed import head_layout

    model = module.model
    masked = model.config.masked_heads()
    alignment = getattr(data, "alignment", None)
    has_alignment = alignment is not None and pairs and alignment(pairs[0][0]) is not None
    roles = cfg["roles"]
    role_inputs = None
    if roles["enabled"]:
        tokenizer = getattr(data, "tokenizer", None)
        punctuation = punctuation_ids(tokenizer) if tokenizer is not None else set()
        role_inputs = RoleInputs(pairs, data.vocab_size, punctuation, float(roles["diagonal_width"]))
    stats, maps = measure_heads(
        model,
        batches(pairs, int(cfg["batch_size"]), int(cfg["maps"]["examples"])),
        local_heads=model.config.num_heads // tp_size,
        gather=gather or (lambda t: t),
        alignment=alignment if has_alignment else None,
        similarity=bool(cfg["similarity"]),
        capture=int(cfg["maps"]["examples"]),
        roles=role_inputs,
        progress=tp_rank == 0,
    )
    results: dict[str, Any] = {
        "checkpoint": str(cfg["ckpt"]),
        "split": cfg["split"],
        "model": {k: getattr(model.config, k) for k in MODEL_KEYS},
        "tensor_parallel_size": tp_size,
        "statistics": stats.to_dict(),
    }
    if role_inputs is not None:
        results["roles"] = head_roles(results["statistics"], roles)
    if cfg["prune"]["enabled"]:
        n = cfg["prune"]["examples"] or len(pairs)
        heads = head_layout(model.config.num_heads, tp_rank, tp_size)
        scorer = TaskScorer(module, data, pairs[:n], int(cfg["batch_size"]), heads, fixed=masked, progress=tp_rank == 0)
        results["pruning"] = prune(stats, scorer, masked, cfg["prune"])
        if cfg["prune"]["single_heads"]:
            results["single_heads"] = single_heads(stats, scorer, masked, bool(cfg["prune"]["single_heads_metric"]))
    example_maps = {"pairs": pairs[: int(cfg["maps"]["examples"])], "maps": maps}
    return results, example_maps


def write(out: Path, results: dict, maps: dict) -> None:
    """results.json and maps.pt in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=1))
    torch.save(maps, out / MAPS_FILE)


def analyze(cfg: dict[str, Any], out: Path) -> tuple[dict[str, Any], Any]:
    """Analyse ``cfg["ckpt"]`` on this process (``trainer.devices`` = 1) or on N spawned, head-sharded
    ranks -> (results, the checkpoint's DataModule)."""
    devices = int(cfg["trainer"]["devices"])
    module, data, pairs = load(cfg["ckpt"], cfg["split"], int(cfg["examples"]))  # user errors surface here, once
    if devices == 1:
        results, maps = analyze_model(module, data, pairs, cfg)
        write(out, results, maps)
        return results, data
    heads = module.model.config.num_heads
    if devices < 1 or heads % devices:
        raise ConfigError(f"trainer.devices ({devices}) must divide the model's num_heads ({heads})")
    from mha_lightning.distributed.launch import run_local, share_cpu_cores

    share_cpu_cores(devices)  # the spawned ranks inherit OMP_NUM_THREADS
    run_local(_sharded_worker, (1, devices), cfg, str(out))
    return json.loads((out / RESULTS_FILE).read_text()), data


def _sharded_worker(mesh, cfg: dict[str, Any], out: str) -> None:
    """One tensor-parallel rank: the model sharded over heads, every example, rank 0 writes."""
    import torch.distributed as dist

    from mha_lightning.distributed import TP
    from mha_lightning.distributed.parallelize import parallelize

    torch.manual_seed(int(cfg["seed"]))
    module, data, pairs = load(cfg["ckpt"], cfg["split"], int(cfg["examples"]))
    if mesh.device_type == "cuda":  # NCCL: one GPU per rank (launch.run_local set it)
        module.to(torch.device("cuda", torch.cuda.current_device()))
    parallelize(module.model, mesh)
    group, world, rank = mesh[TP].get_group(), mesh[TP].size(), mesh[TP].get_local_rank()

    def gather(local: Tensor) -> Tensor:  # (B, H_local, ...) -> (B, H, ...) in global head order
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    results, maps = analyze_model(module, data, pairs, cfg, tp_rank=rank, tp_size=world, gather=gather)
    if rank == 0:
        write(Path(out), results, maps)
    dist.barrier()
