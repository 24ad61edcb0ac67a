"""Sweep jobs: the objective a sweeper optimises, how a trial labels its W&B run, and where its ranks
come from (docs/design.md, "Sweeps of multi-process jobs").

No torch or Lightning import at module level: the sweeping process imports this too.
"""

from __future__ import annotations

import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, open_dict

from mha_lightning.errors import ConfigError

DIRECTIONS = ("minimize", "maximize")
# W&B refuses longer tags; such an override is still in the run's config.
MAX_TAG_LEN = 64


# What every finished run writes into its folder: the final metrics, and the objective's best where it has one.
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class Objective:
    """The metric a sweep optimises (``optimized_metric``) and its direction (``optimized_direction``:
    minimize or maximize), for the job that trains, the sweeper and the sweep report alike; ``source`` says
    where each came from (the report prints it)."""

    metric: str
    direction: str
    source: str = ""

    @property
    def lower_is_better(self) -> bool:
        """Whether smaller values win."""
        return self.direction == "minimize"

    @property
    def best_key(self) -> str:
        """The key of the best value over a run's validations, e.g. ``val/loss_best``."""
        return f"{self.metric}_best"

    @property
    def worst(self) -> float:
        """What a failed or diverged trial reports: the worst possible value, which Optuna records as a
        completed trial (NaN would be a failed trial, which stops the sweep) and TPE learns to avoid."""
        return math.inf if self.direction == "minimize" else -math.inf

    def better(self, value: float, than: float | None) -> bool:
        """Whether ``value`` improves on ``than`` (None: nothing yet)."""
        if than is None:
            return True
        return value < than if self.direction == "minimize" else value > than


# Metric names that say smaller is better (when nothing states a direction).
SMALLER_IS_BETTER = ("loss", "error", "perplexity", "ppl")


def default_direction(metric: str) -> str:
    """minimize for losses, errors and perplexities, maximize for scores (BLEU, chrF, accuracy, exact match)."""
    name = metric.rsplit("/", 1)[-1].lower()
    return "minimize" if any(word in name for word in SMALLER_IS_BETTER) else "maximize"


def objective_of(cfg: DictConfig) -> Objective | None:
    """The run's objective, None when it has no ``optimized_metric``; a bad direction is a ConfigError."""
    metric = cfg.get("optimized_metric")
    if not metric:
        return None
    direction = cfg.get("optimized_direction") or default_direction(str(metric))
    if direction not in DIRECTIONS:
        raise ConfigError(f"optimized_direction must be minimize or maximize, got {direction!r}")
    sweeper = _sweeper_direction()
    if sweeper is not None and sweeper != direction:
        raise ConfigError(
            f"hydra.sweeper.direction ({sweeper}) disagrees with optimized_direction ({direction}) "
            f"for {metric}; set optimized_direction={sweeper}"
        )
    return Objective(str(metric), direction)


def _sweeper_direction() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    direction = HydraConfig.get().sweeper.get("direction")
    return direction if isinstance(direction, str) else None


def best_value(objective: Objective, metrics: dict[str, float]) -> float:
    """The value a sweeper receives: the best over the run's validations, else the final value
    (a ``test/`` metric); the worst value when it is missing or not finite."""
    value = metrics.get(objective.best_key, metrics.get(objective.metric))
    return value if value is not None and math.isfinite(value) else objective.worst


# --------------------------------------------------------------------------- the job
@dataclass(frozen=True)
class SweepJob:
    """One job of a running sweep: the sweep's name (``<job name>-<sweep folder>``, the W&B group unless
    ``logger.wandb.group`` names one), the job's number and its overrides."""

    name: str
    number: int
    overrides: tuple[str, ...]


def current_sweep_job() -> SweepJob | None:
    """This process's sweep job (Hydra ``-m``), None outside a sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra_cfg = HydraConfig.get()
    name = f"{hydra_cfg.job.name}-{Path(str(hydra_cfg.sweep.dir)).name}"
    return SweepJob(name, int(hydra_cfg.job.num), tuple(hydra_cfg.overrides.task))


def label_wandb_run(cfg: DictConfig, job: SweepJob) -> None:
    """Group the job's W&B run under its sweep (``logger.wandb.group`` when set, else the sweep's name),
    tag it with its overrides and record them in its config, so the dashboard compares trials side by side."""
    node = (cfg.get("logger") or {}).get("wandb")
    if not node or "_target_" not in node:
        return
    tags = list(node.get("tags") or [])
    tags += [o for o in job.overrides if len(o) <= MAX_TAG_LEN and o not in tags]
    group = node.get("group") or job.name
    with open_dict(node):
        node.group = group
        node.tags = tags
        node.config = {"sweep": {"group": group, "job": job.number, "overrides": list(job.overrides)}}


# --------------------------------------------------------------------------- ranks from submitit
def submitit_executor() -> str | None:
    """``"slurm"`` or ``"local"`` inside a submitit job, else None."""
    return os.environ.get("SUBMITIT_EXECUTOR") or None


def adopt_submitit_ranks(devices: int, num_nodes: int) -> None:
    """Inside a submitit_local job of several tasks, export each task's rank (RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_ADDR/PORT) so that Lightning treats the tasks as its processes, as it treats
    srun's tasks under SLURM. Nothing to do under SLURM (Lightning reads SLURM's variables) or for one task."""
    if submitit_executor() != "local":
        return
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    env = JobEnvironment()
    if env.num_tasks == 1:
        return
    if num_nodes != 1 or env.num_tasks != devices:
        raise ConfigError(
            f"hydra/launcher=submitit_local runs {env.num_tasks} tasks on one node; it needs trainer.num_nodes=1 "
            f"(got {num_nodes}) and trainer.devices={env.num_tasks} (got {devices})"
        )
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def requeue_slurm_job(rank: int | None) -> bool:
    """After a preemption or SIGUSR1 saved the step reached: requeue this SLURM job (from rank 0), so
    that it runs again with the same config and ``resume=auto`` continues it. True when requeued."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if submitit_executor() != "slurm" or not job_id or rank not in (None, 0):
        return False
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    return True


def trial_failed(objective: Objective | None, why: str) -> float | None:
    """Log why a sweep job failed; the value its sweeper gets instead (None without an objective)."""
    import logging

    value = objective.worst if objective is not None else None
    shown = f"{value} (the worst for {objective.direction} {objective.metric})" if objective else "nothing"
    logging.getLogger(__name__).warning("sweep job failed: %s; it reports %s, the sweep goes on", why, shown)
    return value
