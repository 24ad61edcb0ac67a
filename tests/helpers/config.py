"""Compose real Hydra configs, and the overrides many tests share."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# No entropy monitor, no progress bar, no model summary: quiet, fast runs.
QUIET = ["monitor.enabled=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def compose_train_config(output_dir: Path, overrides: list[str] = ()) -> DictConfig:
    """The config `mha-train <overrides>` would run, writing into ``output_dir``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)  # ${hydra:runtime.output_dir} only exists inside the app
    return cfg


def text_overrides(files: dict[str, Path]) -> list[str]:
    """data=text on a corpus from ``helpers.corpus.write_corpus``."""
    return [
        "data=text",
        f"data.train.src={files['src']}",
        f"data.train.tgt={files['tgt']}",
        f"data.val.tsv={files['tsv']}",
        "data.vocab_size=300",
        "data.batch_size=32",
        "data.eval_batch_size=40",
    ]
