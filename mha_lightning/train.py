"""`mha-train`: the Hydra entry point. ``train(cfg)`` is what tests call."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from mha_lightning.errors import CheckpointError, ConfigError, UserError

log = logging.getLogger(__name__)
CONFIG_PATH = "pkg://mha_lightning.conf"
METRICS_FILE = "metrics.json"


def instantiate(node: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, but a UserError raised by the target reaches the user as itself
    (Hydra wraps it in an InstantiationException with a stack-trace hint)."""
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def check_lengths(cfg: DictConfig) -> None:
    data_max, model_max = cfg.data.get("max_len"), cfg.model.max_len
    if isinstance(data_max, int) and isinstance(model_max, int) and data_max + 1 > model_max:
        raise ConfigError(
            f"data.max_len ({data_max}) + 1 (BOS/EOS) exceeds model.max_len ({model_max}); "
            "raise model.max_len or lower data.max_len"
        )


def reuse_tokenizer(cfg: DictConfig) -> None:
    """A resumed or initialised run tokenizes exactly as its checkpoint did: copy the
    checkpoint's tokenizer into this run instead of training a new one."""
    source = cfg.get("ckpt_path") or cfg.get("init_from")
    target = cfg.data.get("tokenizer_path")
    if not source or not target or Path(target).exists():
        return
    from mha_lightning.checkpoints import run_config

    previous = (run_config(source).get("data") or {}).get("tokenizer_path")
    if previous and Path(previous).is_file():
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(previous, target)
        log.info("reusing the tokenizer of %s: %s", source, previous)


def parallel_sizes(cfg: DictConfig) -> tuple[int, int]:
    """(data_parallel_size, tensor_parallel_size), validated against the model and devices."""
    from mha_lightning.parallel import validate_parallel_config

    devices, num_nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"trainer.devices must be a positive integer, got {devices!r}")
    tp = cfg.parallel.tensor_parallel_size
    dp = cfg.parallel.data_parallel_size
    if dp == "auto":
        dp = max(1, devices * num_nodes // tp) if isinstance(tp, int) and tp > 0 else 1
    validate_parallel_config(cfg.model.num_heads, cfg.model.ffn_dim, dp, tp, devices, num_nodes)
    return dp, tp


def build_strategy(dp: int, tp: int) -> Any:
    if dp * tp == 1:
        return "auto"
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp, save_distributed_checkpoint=True)


def build_callbacks(cfg: DictConfig) -> list:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    monitor = cfg.get("monitor")
    if monitor and monitor.get("enabled", False):
        from mha_lightning.monitor.callback import EntropyMonitor

        kwargs = {k: v for k, v in OmegaConf.to_container(monitor, resolve=True).items() if k != "enabled"}
        callbacks.append(EntropyMonitor(output_dir=cfg.paths.output_dir, **kwargs))
    return callbacks


def build_loggers(cfg: DictConfig) -> list:
    # Only nodes with a _target_: an experiment may set e.g. logger.wandb.group while the
    # user picked logger=csv, which leaves a bare {group: ...} behind.
    return [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]


def launcher_rank() -> Optional[int]:
    """This process's global rank as an external launcher (torchrun, srun) or Lightning's own
    subprocess launcher set it; None in a plain process that has not launched workers yet."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return None


def save_final_checkpoint(trainer) -> None:
    """ModelCheckpoint saves at validation; make last.ckpt hold the weights training ended with."""
    ckpt = trainer.checkpoint_callback
    if ckpt is None or not ckpt.dirpath or getattr(ckpt, "_last_global_step_saved", -1) == trainer.global_step:
        return
    path = Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
    trainer.save_checkpoint(path)  # a collective under ModelParallelStrategy: every rank calls it
    ckpt.last_model_path = str(path)


def check_resume_layout(cfg: DictConfig, dp: int, tp: int) -> None:
    """A sharded checkpoint folder resumes only at the (dp, tp) that wrote it."""
    path = cfg.get("ckpt_path")
    if not path or not Path(str(path)).is_dir():
        return
    from mha_lightning.checkpoints import run_config

    saved = run_config(path)
    if not saved:
        return
    saved_dp, saved_tp = parallel_sizes(OmegaConf.create(saved))
    if (saved_dp, saved_tp) != (dp, tp):
        raise CheckpointError(
            f"ckpt_path={path} was written at (dp={saved_dp}, tp={saved_tp}) and resumes only there (this run: "
            f"dp={dp}, tp={tp}); to change the layout: mha-consolidate {path} model.ckpt, then init_from=model.ckpt"
        )


def check_optimisation(module) -> None:
    """Build the optimizer and schedule once on a dummy parameter, before any worker exists:
    a bad lr or schedule then fails here in one line, not in every worker mid-setup."""
    import torch

    dummy = [torch.nn.Parameter(torch.zeros(1))]
    try:
        optimizer = module.optimizer_factory(params=dummy)
        if module.scheduler_factory is not None:
            module.scheduler_factory(optimizer=optimizer)
    except UserError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"module.optimizer / module.scheduler: {e}") from None


def _check_path(key: str, value: Any) -> None:
    if value is not None and not Path(str(value)).exists():
        raise ConfigError(f"{key}={value} does not exist; point it at a checkpoint file or sharded checkpoint folder")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and optionally test) one run; returns the final metrics as floats."""
    if _is_sweep_job_needing_processes(cfg):
        return _relaunch_sweep_job(cfg)

    import lightning as L  # here, not at import time: `--cfg job` and config errors stay fast

    dp, tp = parallel_sizes(cfg)
    check_lengths(cfg)
    _check_path("ckpt_path", cfg.get("ckpt_path"))
    _check_path("init_from", cfg.get("init_from"))
    if launcher_rank() in (None, 0):
        reuse_tokenizer(cfg)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    datamodule.check_inputs()
    if dp * tp > 1 and launcher_rank() is None:
        # Read the data (train the tokenizer) before any worker exists: a bad file then stops this one
        # process with one line, not rank 0 alone while the others fail in a barrier with a traceback.
        datamodule.prepare_data()
    model = instantiate(cfg.model)
    for key in ("ckpt_path", "init_from"):
        if cfg.get(key):
            from mha_lightning.checkpoints import check_compatible

            check_compatible(cfg[key], model.hparams(), key)
    check_resume_layout(cfg, dp, tp)
    if cfg.get("init_from"):
        from mha_lightning.checkpoints import load_model_weights

        load_model_weights(model, cfg.init_from)
    module = instantiate(cfg.module, model=model, _convert_="partial")
    check_optimisation(module)
    # Saved with every checkpoint and logged as the W&B config (not passed to instantiate, which would
    # build its _target_s). save_hyperparameters, not hparams[...] =: loggers log the initial hparams.
    module.save_hyperparameters({"run_config": OmegaConf.to_container(cfg, resolve=True)})
    loggers = build_loggers(cfg)
    trainer = instantiate(
        cfg.trainer, strategy=build_strategy(dp, tp), callbacks=build_callbacks(cfg), logger=loggers or False
    )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        save_final_checkpoint(trainer)
        metrics = _floats(trainer.callback_metrics)
        if cfg.get("test") and not trainer.fast_dev_run:
            trainer.test(module, datamodule=datamodule, verbose=trainer.is_global_zero)
            metrics.update(_floats(trainer.callback_metrics))
    finally:
        _finish_wandb(loggers)
    if trainer.is_global_zero:
        _report(cfg, trainer, loggers, metrics)
    return metrics


def _floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def _finish_wandb(loggers: list) -> None:
    # A wandb.run left open leaks into the next job of a sweep in this process.
    import wandb

    if wandb.run is not None:
        wandb.finish()
        # finish() can return before the offline run file is complete; teardown waits for it.
        wandb.teardown()


def _report(cfg: DictConfig, trainer, loggers: list, metrics: dict[str, float]) -> None:
    out = Path(cfg.paths.output_dir)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    lines = [f"run directory: {out}"]
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.best_model_path:
        lines.append(f"best checkpoint: {ckpt.best_model_path}")
        lines.append(f"last checkpoint: {ckpt.last_model_path}")
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
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
    whole sweep (DESIGN.md, decision 7). The job's own config has no sweep left in it."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    job = OmegaConf.to_container(cfg, resolve=True)
    OmegaConf.save(OmegaConf.create(job), out / "job_config.yaml")
    cmd = [
        sys.executable, "-m", "mha_lightning.train", "--config-path", str(out.resolve()),
        "--config-name", "job_config", f"hydra.run.dir={out.resolve()}", "hydra.output_subdir=null",
    ]
    log.info("sweep job %s needs several processes: running %s", out, " ".join(cmd))
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"sweep job in {out} failed with exit code {result.returncode}")
    return json.loads((out / METRICS_FILE).read_text())


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    # Sweepers (e.g. Optuna) optimise the returned value.
    objective = cfg.get("optimized_metric")
    return metrics.get(objective) if objective else None


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
