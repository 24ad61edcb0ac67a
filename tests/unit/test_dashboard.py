"""The W&B workspace and the sweep's objective from real composed configs (no server, no run needed)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers.config import CONF_DIR, compose_train_config
from mha_lightning import dashboard
from mha_lightning.dashboard import DashboardSource, ModelShape, entropy_keys
from mha_lightning.errors import ConfigError
from mha_lightning.kinds import ATTENTION_KINDS
from mha_lightning.sweep_report import choose_objective, wandb_settings


def test_base_run_workspace_one_plot_per_kind_and_layer_with_all_eight_heads(tmp_path):
    cfg = compose_train_config(tmp_path / "run", ["model=base"])
    source = DashboardSource(tmp_path / "run", cfg, ModelShape.of(cfg))
    assert source.shape == ModelShape(num_heads=8, encoder_layers=6, decoder_layers=6)
    spec = dashboard.workspace_spec(dashboard.build_workspace(source, entity="team", project="heads"))
    assert (spec["entity"], spec["project"]) == ("team", "heads")
    names = [s["name"] for s in spec["sections"]]
    assert names == [
        "Training",
        "Attention entropy: encoder self-attention",
        "Attention entropy: decoder self-attention",
        "Attention entropy: cross-attention",
        "Attention heatmaps",
        "Entropy collapse",
        "Head importance (Michel et al.)",
    ]  # a single run: no sweep section
    for kind, section in zip(ATTENTION_KINDS, spec["sections"][1:4], strict=True):
        plots = section["panels"]
        # 6 layers x (train, probe) x (raw, normalised), each plot one layer's 8 heads.
        assert len(plots) == 24 and all(p["type"] == "LinePlot" and len(p["y"]) == 8 for p in plots)
        assert plots[1]["y"] == entropy_keys(kind, 0, 8, "train", normalised=True)
        assert plots[3]["y"] == [f"val_attn_entropy_norm/{kind}/L0/H{h}" for h in range(8)]
        assert plots[-4]["y"][-1] == f"attn_entropy/{kind}/L5/H7"
        assert plots[1]["range_y"] == [0, 1]
    importance = spec["sections"][-1]["panels"]
    assert len(importance) == 18 and importance[0]["y"] == [f"val_head_importance/enc_self/L0/H{h}" for h in range(8)]
    train_keys = {k for p in dashboard.panels(spec) for k in p.get("y", []) if k.startswith("attn_entropy")}
    assert len(train_keys) == 288  # what used to be 288 panels: 3 kinds x 6 layers x 8 heads x (raw, normalised)


def test_monitor_settings_shape_the_workspace(tmp_path):
    cfg = compose_train_config(tmp_path / "run", ["monitor.probe=false", "monitor.log_images=false"])
    spec = dashboard.workspace_spec(dashboard.build_workspace(DashboardSource(tmp_path, cfg, ModelShape.of(cfg))))
    assert "Attention heatmaps" not in [s["name"] for s in spec["sections"]]
    keys = [k for p in dashboard.panels(spec) for k in p.get("y", [])]
    assert keys and not any(k.startswith(("val_", "attn_collapse/val")) for k in keys)


def _compose_sweep(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_objective_and_direction_of_a_sweep():
    cfg = _compose_sweep("hparams_search=num_heads")
    objective = choose_objective(cfg)
    assert (objective.metric, objective.direction) == ("val/exact_match", "maximize")
    # The sweep states optimized_direction: the report ranks as the sweep optimised.
    assert objective.source == "metric from optimized_metric, direction optimized_direction"
    OmegaConf.update(cfg, "optimized_direction", "minimize")
    assert choose_objective(cfg).direction == "minimize"
    OmegaConf.update(cfg, "optimized_direction", None)
    assert choose_objective(cfg).source == "metric from optimized_metric, direction inferred from the name"
    # Optuna's sweeper states the direction: it wins.
    OmegaConf.update(cfg, "hydra.sweeper.direction", "minimize", force_add=True)
    assert choose_objective(cfg).direction == "minimize"
    assert choose_objective(cfg, direction="max").source.endswith("direction --direction")
    assert choose_objective(cfg, direction="max").direction == "maximize"
    # No optimized_metric: the checkpoint callback's monitor and mode.
    objective = choose_objective(_compose_sweep())
    assert (objective.metric, objective.direction) == ("val/loss", "minimize")
    assert objective.source == (
        "metric from callbacks.model_checkpoint.monitor, direction callbacks.model_checkpoint.mode"
    )
    assert wandb_settings(cfg) == {
        "project": "mha_lightning",
        "entity": None,
        "group": "num_heads",
        "tags": [],
        "offline": None,
    }
    assert wandb_settings(_compose_sweep("logger=csv")) is None


def test_a_config_without_a_model_shape_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.num_decoder_layers must be .* got \[4, None, None\]"):
        ModelShape.of(OmegaConf.create({"model": {"num_heads": 4}}))
