"""`mha-analyze`: what the heads of a trained model do (Hydra, like `mha-train`).

    mha-analyze ckpt=logs/train/runs/<time>/checkpoints/last.ckpt split=val
    mha-analyze ckpt=<sharded folder> trainer.devices=2 prune.enabled=false

Reads ``report.md`` first; the numbers are in ``heads.csv`` and ``results.json``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mha_lightning.errors import ConfigError, UserError, report

log = logging.getLogger(__name__)
CONFIG_PATH = "pkg://mha_lightning.conf"


def check(cfg: dict[str, Any]) -> None:
    """One line naming the value for every bad setting, before any model is loaded."""
    if not cfg.get("ckpt"):
        raise ConfigError("ckpt is required: mha-analyze ckpt=<a .ckpt file or sharded checkpoint folder>")
    if cfg["split"] not in ("val", "test"):
        raise ConfigError(f"split={cfg['split']!r} must be val or test")
    prune, minimum = cfg["prune"], {}
    minimum.update(examples=(cfg["examples"], 1), batch_size=(cfg["batch_size"], 1))
    minimum.update({"trainer.devices": (cfg["trainer"]["devices"], 1), "maps.examples": (cfg["maps"]["examples"], 0)})
    minimum.update({"prune.points": (prune["points"], 2), "prune.random_orders": (prune["random_orders"], 0)})
    for key, (value, least) in minimum.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{key} must be an integer of at least {least}, got {value!r}")
    for key in ("tolerance", "wide_tolerance"):
        if not 0.0 <= float(prune[key]) < 1.0:
            raise ConfigError(f"prune.{key} must be in [0, 1), got {prune[key]!r}")
    roles = cfg["roles"]
    for key in ("positional", "sink", "rare", "diffuse", "monotone", "diagonal_width"):
        value = roles[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < float(value) <= 1.0:
            raise ConfigError(f"roles.{key} must be a number in (0, 1], got {value!r}")


def run(cfg: DictConfig) -> Path:
    """Analyse, render and (optionally) log -> the report's path."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    check(settings)  # before importing torch: a typo costs a second, not ten

    from mha_lightning import run_log
    from mha_lightning.analysis.report import render
    from mha_lightning.analysis.run import analyze
    from mha_lightning.checkpoints import read_info

    read_info(settings["ckpt"], "ckpt")  # its metadata only: a bad checkpoint is the one line, before any other
    run_log.release_console()
    # Nothing is written before the analysis has loaded what it needs (its user errors come first): a refused
    # command leaves no folder behind (docs/design.md, "Run folders").
    out = Path(cfg.paths.output_dir)
    results, data = analyze(settings, out)
    OmegaConf.save(cfg, out / "analyze_config.yaml")
    path = render(out, lambda token: data.detokenize([token]) or str(token))
    if settings["wandb"]["enabled"]:
        log_to_wandb(out, results, settings)
    if HydraConfig.initialized():
        run_log.attach_file(out / f"{HydraConfig.get().job.name}.log")
    print(summary(results, path), flush=True)
    return path


def summary(results: dict[str, Any], path: Path) -> str:
    """The console's few lines: where the report is and its headline numbers."""
    lines = [f"report: {path}"]
    pruning = results.get("pruning")
    if pruning:
        total = pruning["points"][-1]
        lines.append(
            f"{pruning['metric']} {pruning['baseline']:.4f} with every head; {pruning['removable']['importance']} of "
            f"{total} heads removable within {pruning['tolerance']:.0%} (least important first)"
            + (" -- the full model scores 0: train it longer" if pruning["baseline"] <= 0 else "")
        )
    return "\n".join(lines)


def log_to_wandb(out: Path, results: dict[str, Any], settings: dict[str, Any]) -> None:
    """The pictures, the head table and the headline numbers as one W&B run (job_type ``analysis``)."""
    import wandb

    from mha_lightning.analysis.report import HEAD_COLUMNS, head_rows
    from mha_lightning.loggers import wandb_mode

    run = wandb.init(
        project=settings["wandb"]["project"],
        dir=str(out),
        mode=wandb_mode(None),
        job_type="analysis",
        config={k: v for k, v in settings.items() if k != "wandb"},
    )
    try:
        rows = head_rows(results["statistics"])
        data = [[r["head"], *(r[c] for c in HEAD_COLUMNS)] for r in rows]
        table = wandb.Table(columns=["head", *HEAD_COLUMNS], data=data)
        logged: dict[str, Any] = {"analysis/heads": table}
        logged.update({f"analysis/{p.stem}": wandb.Image(str(p)) for p in sorted(out.glob("*.png"))})
        pruning = results.get("pruning")
        if pruning:
            logged["analysis/baseline"] = pruning["baseline"]
            logged.update({f"analysis/removable/{k}": v for k, v in pruning["removable"].items()})
        run.log(logged)
    finally:
        run.finish()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="analyze")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (UserError, OmegaConfBaseException) as e:
        from mha_lightning import run_log
        from mha_lightning.run_folder import remove_new_folders

        run_log.drop_held()
        remove_new_folders(HydraConfig.get().runtime.output_dir)  # the folder Hydra made for it, while empty
        error = e if isinstance(e, UserError) else ConfigError(" ".join(str(e).split()))
        sys.exit(report(error))


def main() -> None:
    """`mha-analyze` entry point (the command line is composed once before Hydra runs it)."""
    from mha_lightning.overrides import check_command_line

    problem = check_command_line(sys.argv[1:], config_name="analyze")
    if problem is not None:
        sys.exit(report(ConfigError(problem)))
    _hydra_main()


if __name__ == "__main__":
    main()
