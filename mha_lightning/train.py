"""`mha-train`: the Hydra entry point. ``train(cfg)`` is what tests call."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mha_lightning import run_log
from mha_lightning.config import MonitorConfig, RunPlan, instantiate, preflight
from mha_lightning.errors import ConfigError, NonFiniteError, Preempted, RankLost, UserError, first_line, report
from mha_lightning.loggers import check_wandb_online
from mha_lightning.run_folder import RunLock, check_start, clear_run
from mha_lightning.sweeps import (
    METRICS_FILE,
    adopt_submitit_ranks,
    best_value,
    current_sweep_job,
    label_wandb_run,
    objective_of,
    requeue_slurm_job,
    submitit_executor,
    trial_failed,
)

log = logging.getLogger(__name__)
CONFIG_PATH = "pkg://mha_lightning.conf"


def checkpoint_tokenizer(plan: RunPlan) -> Path | None:
    """The tokenizer file of the run a resumed or initialised run continues (it tokenizes exactly as its checkpoint
    did), None without one."""
    source = plan.resume or plan.init
    previous = (source.run_config.get("data") or {}).get("tokenizer_path") if source is not None else None
    return Path(previous) if previous and Path(previous).is_file() else None


def tokenizer_source(cfg: DictConfig, plan: RunPlan, replacing: bool) -> Path | None:
    """The tokenizer the data checks load: the run's own file (unless overwrite=true replaces the run), else the
    checkpoint's; None: train one."""
    target = cfg.data.get("tokenizer_path")
    if target and Path(target).exists() and not (replacing and _inside(Path(target), Path(cfg.paths.output_dir))):
        return Path(target)
    return checkpoint_tokenizer(plan)


def reuse_tokenizer(cfg: DictConfig, plan: RunPlan) -> None:
    """A resumed or initialised run tokenizes exactly as its checkpoint did: copy the
    checkpoint's tokenizer into this run instead of training a new one."""
    target = cfg.data.get("tokenizer_path")
    previous = checkpoint_tokenizer(plan)
    if previous is None or not target or Path(target).exists():
        return
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(previous, target)
    log.info("reusing the tokenizer of %s: %s", (plan.resume or plan.init).path, previous)


def _inside(path: Path, folder: Path) -> bool:
    return folder.resolve() in path.resolve().parents


def save_run_record(cfg: DictConfig) -> None:
    """Write Hydra's record of the run (``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``)
    into the run directory, now that the config is accepted (``hydra.output_subdir`` is null so
    that Hydra itself writes nothing before the checks: a rejected command leaves a run intact)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    record = Path(hydra_cfg.runtime.output_dir) / ".hydra"
    record.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, record / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), record / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, record / "overrides.yaml")


def build_model(cfg: DictConfig, plan: RunPlan) -> Any:
    """The run's model. Sharded runs build it on the meta device (no memory): each rank initialises only
    its own shards once it is sharded (``distributed.parallelize``), from the same seed, to the weights a
    single-device build gets. ``init_from`` weights are loaded into a whole model before sharding."""
    import torch

    if plan.init is not None:
        from mha_lightning.checkpoints import load_model_weights

        model = instantiate(cfg.model, config_key="model")
        load_model_weights(model, plan.init)
        return model
    with torch.device("meta") if plan.world_size > 1 else contextlib.nullcontext():
        return instantiate(cfg.model, config_key="model")


def build_strategy(plan: RunPlan) -> Any:
    """Lightning's "auto" on one device, else a ModelParallelStrategy over the (dp, tp) mesh whose sharded
    checkpoints appear only when complete (``AtomicModelParallelStrategy``)."""
    if plan.world_size == 1:
        return "auto"
    from datetime import timedelta

    from mha_lightning.checkpoint_io import AtomicModelParallelStrategy

    return AtomicModelParallelStrategy(
        data_parallel_size=plan.data_parallel_size,
        tensor_parallel_size=plan.tensor_parallel_size,
        save_distributed_checkpoint=True,
        # torch's default is 30 minutes: a hung rank would stall every other one that long.
        timeout=timedelta(minutes=plan.parallel.timeout_minutes),
    )


def build_callbacks(cfg: DictConfig, monitor: MonitorConfig, world_size: int = 1) -> list:
    """The configured callbacks, the preemption checkpoint (SIGTERM, SIGUSR1), each rank's progress
    note when there are several, the best value of ``optimized_metric`` when set, and the monitor if enabled."""
    from mha_lightning.preemption import PreemptionCheckpoint

    callbacks = [instantiate(c, config_key=f"callbacks.{k}") for k, c in (cfg.get("callbacks") or {}).items() if c]
    callbacks.append(PreemptionCheckpoint())
    objective = objective_of(cfg)
    if objective is not None:
        from mha_lightning.best_metric import BestMetric

        callbacks.append(BestMetric(objective))
    if world_size > 1:
        from mha_lightning.heartbeat import Heartbeat

        callbacks.append(Heartbeat(cfg.paths.output_dir))
    if monitor.enabled:
        from mha_lightning.monitor.callback import EntropyMonitor

        callbacks.append(EntropyMonitor(monitor, output_dir=cfg.paths.output_dir))
    return callbacks


def build_loggers(cfg: DictConfig, plan: RunPlan | None = None) -> list:
    """The configured loggers (empty: no logging); a resumed run continues its checkpoint's W&B run."""
    # Only nodes with a _target_: an experiment may set e.g. logger.wandb.group while the
    # user picked logger=csv, which leaves a bare {group: ...} behind.
    run_id = plan.resume.wandb_run_id if plan is not None and plan.resume is not None else None
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node and "_target_" in node:
            extra = {"id": run_id, "resume": "allow"} if name == "wandb" and run_id else {}
            loggers.append(instantiate(node, config_key=f"logger.{name}", **extra))
    return loggers


def build_trainer(cfg: DictConfig, plan: RunPlan, loggers: list) -> Any:
    """The run's Trainer: its strategy, callbacks and loggers; on one device, single-file checkpoints
    written atomically (``AtomicCheckpointIO``). Sharded checkpoints are the strategy's own (``build_strategy``)."""
    extra = {}
    if plan.world_size == 1:
        from mha_lightning.checkpoint_io import AtomicCheckpointIO  # here: imports torch and Lightning

        extra["plugins"] = [AtomicCheckpointIO()]
    k = cfg.trainer.get("accumulate_grad_batches", 1) or 1
    interval = cfg.trainer.get("val_check_interval")
    if k > 1 and isinstance(interval, int) and not isinstance(interval, bool):
        # Lightning counts val_check_interval in batches; ours is in optimizer steps, each of k batches.
        extra["val_check_interval"] = interval * k
    return instantiate(
        cfg.trainer,
        config_key="trainer",
        strategy=build_strategy(plan),
        callbacks=build_callbacks(cfg, plan.monitor, plan.world_size),
        logger=loggers or False,
        **extra,
    )


def launcher_rank() -> int | None:
    """This process's global rank as an external launcher (torchrun, srun) or Lightning's own
    subprocess launcher set it; None in a plain process that has not launched workers yet."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return None


def fit(trainer, module, datamodule, plan: RunPlan) -> None:
    """``trainer.fit`` (resuming ``plan.resume``); a preemption signal or a non-finite step becomes one error line.

    A SIGTERM or SIGUSR1 stops every rank before the same step and saves it (``PreemptionCheckpoint``);
    the run then ends with :class:`~mha_lightning.errors.Preempted` (exit 143)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from mha_lightning.preemption import PreemptionCheckpoint

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=plan.resume.path if plan.resume else None)
    except SIGTERMException:
        stop = next((c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)), None)
        name = (stop.signal_name if stop else None) or "SIGTERM"
        saved = stop.saved if stop else None
        where = f"saved {saved}; resume=auto (or ckpt_path={saved}) continues it" if saved else "nothing saved"
        raise Preempted(f"stopped by {name} at step {trainer.global_step}; {where}") from None
    except NonFiniteError as e:
        raise NonFiniteError(f"{e}; last good checkpoint: {_last_checkpoint(trainer)}") from None
    except Exception as e:
        if trainer.world_size == 1 or not _is_collective_failure(e):
            raise
        raise _rank_lost(trainer, plan) from None


def _last_checkpoint(trainer) -> str:
    """The newest checkpoint this run saved, for an error line ("none saved yet" before the first)."""
    ckpt = trainer.checkpoint_callback
    last = (ckpt.last_model_path or ckpt.best_model_path) if ckpt is not None else ""
    return last or "none saved yet"


def _is_collective_failure(error: Exception) -> bool:
    """A collective that timed out or lost its peer (gloo raises RuntimeError, NCCL DistBackendError)."""
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, dist.DistBackendError) or (
        isinstance(error, RuntimeError) and any(s in text for s in ("gloo", "NCCL", "Timed out", "Connection closed"))
    )


def _rank_lost(trainer, plan: RunPlan) -> RankLost:
    """The error for a failed collective, naming the rank that fell silent; it ends this process's
    worker processes (when Lightning started them) at exit, so none is left waiting."""
    from mha_lightning.heartbeat import Heartbeat, silent_ranks

    heartbeat = next(c for c in trainer.callbacks if isinstance(c, Heartbeat))
    who = silent_ranks(heartbeat.folder, trainer.world_size, trainer.global_rank)
    return RankLost(
        f"rank {trainer.global_rank} waited in a collective that failed at step {trainer.global_step} "
        f"(parallel.timeout_minutes={plan.parallel.timeout_minutes:g}): {who}; "
        f"last checkpoint: {_last_checkpoint(trainer)} (resume=auto continues from it)",
        workers=trainer.strategy.launcher,
    )


def save_final_checkpoint(trainer, module) -> None:
    """ModelCheckpoint saves at validation; make last.ckpt hold the weights training ended with."""
    ckpt = trainer.checkpoint_callback
    if ckpt is None or not ckpt.dirpath or module.last_saved_step == trainer.global_step:
        return
    path = Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
    trainer.save_checkpoint(path)  # a collective under ModelParallelStrategy: every rank calls it
    ckpt.last_model_path = str(path)


def validate_final_weights(trainer, module, datamodule) -> None:
    """Validate the weights training ended with when its last validation came before its last step
    (``max_steps`` not a multiple of ``val_check_interval``): the run's val metrics, metrics.json and
    a sweep's objective then describe last.ckpt, not an earlier step. Every rank calls it (a collective)."""
    if trainer.fast_dev_run or not trainer.limit_val_batches or module.validated_step == trainer.global_step:
        return
    trainer.validate(module, datamodule=datamodule, verbose=False)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and optionally test) one run; returns the final metrics as floats, and ``<optimized_metric>_best``,
    the objective's best value over the run's validations, when the config names one."""
    objective_of(cfg)  # a bad optimized_direction stops here, before anything runs
    job = current_sweep_job()
    if job is not None:
        label_wandb_run(cfg, job)
        adopt_submitit_ranks(cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1))
    if _is_sweep_job_needing_processes(cfg):
        return _relaunch_sweep_job(cfg)

    import lightning as L  # here, not at import time: `--cfg job` and config errors stay fast

    run_log.hold_logger("lightning")  # its own console (stderr) waits for the checks too
    # Every check runs before the first byte is written; then the launching process locks the run folder for the
    # whole job (docs/design.md, "Run folders"). Its other processes never touch the lock.
    out = Path(cfg.paths.output_dir)
    lock = RunLock(out) if launcher_rank() in (None, 0) else None
    if lock is not None:
        lock.check()  # a folder in use: refused at once, not after the seconds the checks take
    plan = preflight(cfg)
    replacing = False
    if lock is not None:
        resume_from = plan.resume.path if plan.resume is not None else None
        replacing = _check_folder(cfg, out, resume_from) is not None and bool(cfg.get("overwrite"))
        check_wandb_online((cfg.get("logger") or {}).get("wandb"))
    if plan.world_size > 1:
        from mha_lightning.distributed.launch import share_cpu_cores

        per_node = max(1, plan.world_size // int(cfg.trainer.get("num_nodes", 1) or 1))
        threads = share_cpu_cores(per_node)
        if threads is not None and launcher_rank() in (None, 0):
            log.info("%d processes on this node, %d CPU thread(s) each", per_node, threads)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data, config_key="data")
    datamodule.check_inputs()
    # prepare_data writes into the run directory, which every node shares: global rank 0 alone runs it (Lightning's
    # default, once per node, had two nodes train the tokenizer and write one tokenizer.json at the same time).
    datamodule.prepare_data_per_node = False
    if lock is not None:
        # Read every file and build the tokenizer now: a bad file is one line before anything is written, and
        # before any worker exists (not rank 0 alone while the others fail in a barrier with a traceback).
        datamodule.read_inputs(tokenizer_source(cfg, plan, replacing))
    model = build_model(cfg, plan)
    module = instantiate(
        cfg.module, config_key="module", model=model, parallel=asdict(plan.parallel), _convert_="partial"
    )
    # Saved with every checkpoint and logged as the W&B config (not passed to instantiate, which would
    # build its _target_s). save_hyperparameters, not hparams[...] =: loggers log the initial hparams.
    module.save_hyperparameters({"run_config": OmegaConf.to_container(cfg, resolve=True)})
    loggers = build_loggers(cfg, plan)
    trainer = build_trainer(cfg, plan, loggers)
    try:
        _take_folder(cfg, plan, lock, replacing)
        if plan.world_size > 1 and launcher_rank() is None:
            datamodule.prepare_data()  # the tokenizer, saved before the workers that load it exist
        metrics = _fit_and_test(cfg, trainer, module, datamodule, plan, loggers)
    finally:
        if lock is not None:
            lock.release()
    return metrics


def _check_folder(cfg: DictConfig, out: Path, resume_from: Path | None) -> str | None:
    """Refuse a plain start in a folder that holds a run (``resume=auto``, a ``ckpt_path`` of this folder or
    ``overwrite=true`` may start there) -> what the folder holds, if anything."""
    resuming = cfg.get("resume") == "auto" or (resume_from is not None and _inside(resume_from, out))
    return check_start(out, resuming=resuming, overwrite=bool(cfg.get("overwrite")))


def _take_folder(cfg: DictConfig, plan: RunPlan, lock: RunLock | None, replacing: bool) -> None:
    """The run is accepted: lock its folder (the launching process), clear an earlier run that overwrite=true
    replaces, open the log file, show the checks' log lines, then write the run's record and tokenizer."""
    out = Path(cfg.paths.output_dir)
    job_name = _job_name()
    if lock is not None:
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        _check_folder(cfg, out, plan.resume.path if plan.resume else None)  # again: no other start can change it now
        if replacing:
            removed = clear_run(out, job_name or "train")
            log.warning("overwrite=true: removed the earlier run in %s (%s)", out, ", ".join(removed))
    if job_name is not None and (lock is not None or _is_lightning_worker()):
        # Torchrun's and srun's other ranks log to their launcher only: they cannot know yet that the folder is theirs.
        run_log.attach_file(out / f"{job_name}.log")
    run_log.release_console()
    if lock is not None:
        save_run_record(cfg)
        reuse_tokenizer(cfg, plan)


def _job_name() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    return str(HydraConfig.get().job.name) if HydraConfig.initialized() else None


def _fit_and_test(cfg: DictConfig, trainer, module, datamodule, plan: RunPlan, loggers: list) -> dict[str, float]:
    """Fit, validate the final weights, test; print where everything went (global rank 0) -> the final metrics."""
    try:
        fit(trainer, module, datamodule, plan)
        save_final_checkpoint(trainer, module)
        metrics = _floats(trainer.callback_metrics)
        validate_final_weights(trainer, module, datamodule)
        metrics.update(_floats(trainer.callback_metrics))  # a validate() keeps only its own metrics
        if cfg.get("test") and not trainer.fast_dev_run:
            trainer.test(module, datamodule=datamodule, verbose=trainer.is_global_zero)
            metrics.update(_floats(trainer.callback_metrics))
        metrics.update(_best_metric(trainer))
    finally:
        _finish_wandb(loggers)
    if trainer.is_global_zero:
        _report(cfg, trainer, loggers, metrics)
    return metrics


def _floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def _best_metric(trainer) -> dict[str, float]:
    """``{<optimized_metric>_best: value}`` from the BestMetric callback (empty without one, or before a validation)."""
    from mha_lightning.best_metric import BestMetric

    tracker = next((c for c in trainer.callbacks if isinstance(c, BestMetric)), None)
    return {tracker.objective.best_key: tracker.best} if tracker is not None and tracker.best is not None else {}


def _finish_wandb(loggers: list) -> None:
    # A wandb.run left open leaks into the next job of a sweep in this process. Never imported: no run
    # (importing it costs every rank of a run without W&B seconds of CPU).
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
        # finish() can return before the offline run file is complete; teardown waits for it.
        wandb.teardown()


def _report(cfg: DictConfig, trainer, loggers: list, metrics: dict[str, float]) -> None:
    out = Path(cfg.paths.output_dir)
    # Strict JSON: a non-finite value is written as null, never as a bare NaN.
    finite = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
    (out / METRICS_FILE).write_text(json.dumps(finite, indent=2, sort_keys=True, allow_nan=False))
    lines = [f"run directory: {out}"]
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.best_model_path:
        lines.append(f"best checkpoint: {ckpt.best_model_path}")
        lines.append(f"last checkpoint: {ckpt.last_model_path}")
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger):
            runs = sorted((out / "wandb").glob("offline-run-*"))
            if runs:
                lines.append(f"W&B (offline): {runs[-1]}  ->  upload with: wandb sync {runs[-1]}")
    if (out / "attention_entropy.csv").exists():
        lines.append(f"attention entropy: {out / 'attention_entropy.csv'}  ->  pictures: mha-plot {out}")
    shown = {k: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith(("val/", "test/"))}
    lines.append(f"final metrics: {shown}")
    print("\n".join(lines), flush=True)


# --------------------------------------------------------------------------- sweeps
def _is_sweep_job_needing_processes(cfg: DictConfig) -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    return cfg.trainer.get("devices", 1) * cfg.trainer.get("num_nodes", 1) > 1 and launcher_rank() is None


def _relaunch_sweep_job(cfg: DictConfig) -> dict[str, float]:
    """Run this sweep job's multi-process training as a single run of its own resolved config.

    Lightning's launcher re-runs sys.argv; inside `-m` that would make every worker run the
    whole sweep (docs/design.md, "Sweeps of multi-process jobs"). The job's own config has no sweep left in it."""
    run_log.release_console()  # this process only launches the job: the job's own process checks and refuses
    out = Path(cfg.paths.output_dir)
    # Before job_config.yaml is written: a folder another job holds, or a run fills, is refused here (read only).
    RunLock(out).check()
    _check_folder(cfg, out, Path(str(cfg.ckpt_path)) if cfg.get("ckpt_path") else None)
    out.mkdir(parents=True, exist_ok=True)
    job = OmegaConf.to_container(cfg, resolve=True)
    OmegaConf.save(OmegaConf.create(job), out / "job_config.yaml")
    cmd = [
        sys.executable,
        "-m",
        "mha_lightning.train",
        "--config-path",
        str(out.resolve()),
        "--config-name",
        "job_config",
        f"hydra.run.dir={out.resolve()}",
        "hydra.output_subdir=null",
    ]
    log.info("sweep job %s needs several processes: running %s", out, " ".join(cmd))
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        # Its own error line is already printed: this one only names the job.
        raise UserError(f"sweep job in {out} failed with exit code {result.returncode}")
    return json.loads((out / METRICS_FILE).read_text())


def _run_sweep_job(cfg: DictConfig) -> float | None:
    """One job of a sweep: the objective's best value for the sweeper (None without ``optimized_metric``).

    A job that fails or diverges never ends the sweep: it reports the objective's worst value (+inf when
    minimising), which Optuna records as a completed, bad trial. Under SLURM a preempted job is requeued
    instead (rank 0 asks SLURM; ``resume=auto`` continues it). docs/design.md, "Sweeps of multi-process jobs"."""
    try:
        objective = objective_of(cfg)
    except UserError as e:  # the same for every job: the sweep stops here
        sys.exit(report(e, launcher_rank()))
    try:
        metrics = train(cfg)
    except Preempted as e:
        if submitit_executor() != "slurm":
            return trial_failed(objective, first_line(e))
        code = report(e, launcher_rank())
        requeue_slurm_job(launcher_rank())
        sys.exit(code)  # a SystemExit: submitit records no result and waits for the requeued job
    except UserError as e:
        run_log.drop_held()  # a refused job: its one line, not the checks' lines after it
        report(e, launcher_rank())
        return trial_failed(objective, first_line(e))
    except Exception as e:  # noqa: BLE001 - a bug in one trial: its traceback goes to the job's log, the sweep goes on
        log.exception("sweep job %s raised", cfg.paths.output_dir)
        return trial_failed(objective, f"{type(e).__name__}: {first_line(e)}")
    if objective is None:
        return None
    if objective.best_key not in metrics and objective.metric not in metrics:
        logged = ", ".join(sorted(k for k in metrics if k.startswith(("val/", "test/"))))
        return trial_failed(objective, f"optimized_metric {objective.metric} was never logged (logged: {logged})")
    return best_value(objective, metrics)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    if current_sweep_job() is not None:
        if _started_with_peers() and submitit_executor() is None:
            # torchrun or srun started this process and others: every one would run a sweep of its own.
            sys.exit(
                report(
                    ConfigError(
                        "a sweep (-m, hparams_search) started by torchrun or srun runs once per process; "
                        "start it with plain mha-train, or on SLURM with hydra/launcher=slurm"
                    ),
                    launcher_rank(),
                )
            )
        return _run_sweep_job(cfg)
    try:
        metrics = train(cfg)
    except RankLost as e:
        # Lightning's launcher watches its workers and SIGKILLs this process too once one of them
        # ends: report first, then end the (hung) workers and leave at once with our exit code.
        code = report(e, launcher_rank())
        e.end_workers()
        os._exit(code)
    except UserError as e:
        _forget_refused_start()
        code = report(e, launcher_rank())
        if e.every_rank and _is_lightning_worker():
            _wait_for_main_process()
        sys.exit(code)
    except OmegaConfBaseException as e:  # e.g. seed=${oops}: an interpolation resolved only now
        _forget_refused_start()
        sys.exit(report(ConfigError(" ".join(str(e).split())), launcher_rank()))
    objective = objective_of(cfg)
    return best_value(objective, metrics) if objective else None


def _forget_refused_start() -> None:
    """A refused command leaves no trace: its held log lines are dropped and the folders Hydra created for it
    removed (once a run wrote into its folder, that folder is no longer empty and stays)."""
    from hydra.core.hydra_config import HydraConfig

    from mha_lightning.run_folder import remove_new_folders

    run_log.drop_held()
    if HydraConfig.initialized():
        remove_new_folders(HydraConfig.get().runtime.output_dir)


def _started_with_peers() -> bool:
    """Whether an external launcher (torchrun, srun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) > 1


def _is_lightning_worker() -> bool:
    """A worker process started by Lightning's own launcher (not by torchrun or srun)."""
    env = os.environ
    return "RANK" not in env and "SLURM_PROCID" not in env and int(env.get("LOCAL_RANK", "0")) > 0


def _wait_for_main_process(timeout: float = 30.0) -> None:
    """Let the main process (rank 0) report an error every rank raised, and exit, first: Lightning's
    launcher watches its workers and SIGKILLs the main process as soon as one ends non-zero."""
    import time

    parent, deadline = os.getppid(), time.monotonic() + timeout
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.1)


def main() -> None:
    """`mha-train` entry point (Hydra parses the command line, once it is known to compose)."""
    from mha_lightning.overrides import check_command_line

    # Our hydra/launcher=submitit_local refines the plugin's config of that name, so Hydra validates it
    # against the plugin's schema (what we want) and warns that this matching is deprecated (noise).
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_local' is validated against ConfigStore")
    problem = check_command_line(sys.argv[1:])
    if problem is not None:
        sys.exit(report(ConfigError(problem)))
    _hydra_main()


if __name__ == "__main__":
    main()
