"""Reading the training log's perf/* keys back, and what they should say about a run's batches."""

from __future__ import annotations

import csv
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from mha_lightning.data.vocab import PAD_ID
from mha_lightning.model.flops import train_flops


def perf_rows(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> the perf/* values logged at that step (CSV logger)."""
    rows: dict[int, dict[str, float]] = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            values = {k: float(v) for k, v in row.items() if k.startswith("perf/") and v}
            if values:
                rows[int(row["step"])] = values
    return rows


def saved_config(run_dir: Path) -> DictConfig:
    """The config a `mha-train` run saved in ``run_dir`` (its Hydra-only interpolations filled in)."""
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    cfg.paths.output_dir = str(run_dir)
    return cfg


def batches_of(cfg, steps: int, replicas: int = 1) -> list[tuple[int, int]]:
    """(real source + target tokens, model FLOPs) of the first ``steps`` global training batches of a run
    with config ``cfg`` (its data in the order its seeded sampler gives them; ``replicas`` data-parallel
    ranks, each with data.batch_size examples of every global batch)."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    data = hydra.utils.instantiate({**cfg["data"], "batch_size": cfg["data"]["batch_size"] * replicas})
    data.setup("fit")
    model = {k: v for k, v in cfg["model"].items() if not k.startswith("_")}
    out = []
    for batch, _ in zip(data.train_dataloader(), range(steps), strict=False):
        src, tgt = batch["src"], batch["tgt_out"]
        tokens = int((src != PAD_ID).sum() + (tgt != PAD_ID).sum())
        out.append((tokens, train_flops(model, src.shape[0], src.shape[1], tgt.shape[1])))
    return out
