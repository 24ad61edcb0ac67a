"""One config schema: dataclass defaults equal the default YAML, and preflight validates once."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from mha_lightning.checkpoints import read_info
from mha_lightning.config import DecodingConfig, MonitorConfig, ParallelConfig, preflight
from mha_lightning.errors import CheckpointError, ConfigError, UserError
from mha_lightning.model import TransformerConfig


def defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def test_every_schema_default_is_its_default_yaml(make_cfg):
    cfg = OmegaConf.to_container(make_cfg(), resolve=True)
    model = {k: v for k, v in cfg["model"].items() if not k.startswith("_")}
    schema = defaults(TransformerConfig)
    assert set(model) - {"vocab_size"} == set(schema) - {"pad_id"}, "model YAML and TransformerConfig keys differ"
    assert {k: model[k] for k in schema if k in model} == {k: v for k, v in schema.items() if k in model}
    assert cfg["module"]["decoding"] == defaults(DecodingConfig)
    assert cfg["monitor"] == defaults(MonitorConfig)
    assert cfg["parallel"] == defaults(ParallelConfig)


def test_the_monitor_takes_its_settings_from_the_config_group_alone(make_cfg):
    from mha_lightning.monitor.callback import EntropyMonitor

    config = MonitorConfig.from_dict(
        OmegaConf.to_container(make_cfg("monitor.every_n_steps=7", "monitor.probe=false").monitor)
    )
    monitor = EntropyMonitor(config)
    assert (monitor.every_n_steps, monitor.probe) == (7, False)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("monitor.collapse_threshold=1.5", "monitor.collapse_threshold"),
        ("monitor.every_n_steps=0", "monitor.every_n_steps"),
        ("+monitor.every_n_step=3", "monitor has no option 'every_n_step'"),
        ("trainer.max_steps=-5", "trainer.max_steps"),
        ("module.decoding.strategy=sample", "module.decoding.strategy"),
        ("module.decoding.beam_size=0", "module.decoding.beam_size"),
        ("module.decoding.length_penalty=-1", "module.decoding.length_penalty"),
        ("model.num_heads=0", "model.num_heads"),
        ("model.activation=tanh", "model.activation"),
        ("parallel.data_parallel_size=3", "parallel.data_parallel_size (3) x parallel.tensor_parallel_size (1)"),
        ("parallel.tensor_parallel_size=3", "model.num_heads (4) must be divisible"),
        ("data.max_len=200", "data.max_len (200) + 1"),
        ("module.optimizer.lr=-1", "module.optimizer"),
        ("ckpt_path=/no/such/file.ckpt", "ckpt_path=/no/such/file.ckpt does not exist"),
        ("init_from=/no/such/dir", "init_from=/no/such/dir does not exist"),
        ("trainer.precision=bf16-mixed", "trainer.precision=bf16-mixed on a CPU"),
        ("parallel.timeout_minutes=0", "parallel.timeout_minutes must be a positive number"),
        ("module.on_nonfinite=ignore", "module.on_nonfinite='ignore' must be one of"),
    ],
)
def test_preflight_names_the_bad_value_in_one_line(make_cfg, override, needle):
    with pytest.raises(UserError) as info:
        preflight(make_cfg(override))
    message = str(info.value)
    assert needle in message and "\n" not in message, message


TP2 = ["trainer.devices=2", "parallel.tensor_parallel_size=2"]


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["model.num_heads=3", *TP2], ["model.num_heads (3)", "tensor_parallel_size (2)"]),
        (["parallel.data_parallel_size=2", *TP2], ["data_parallel_size (2)", "trainer.devices (2)"]),
        (["model.ffn_dim=63", *TP2], ["model.ffn_dim (63)", "tensor_parallel_size (2)"]),
        (["parallel.tensor_parallel_size=8", "trainer.devices=8"], ["tensor_parallel_size (8)", "num_heads (4)"]),
    ],
    ids=["heads_not_divisible", "dp_x_tp_not_devices", "ffn_not_divisible", "tp_above_heads"],
)
def test_preflight_refuses_a_bad_layout_naming_the_values(make_cfg, overrides, needles):
    with pytest.raises(ConfigError) as info:
        preflight(make_cfg(*overrides))
    assert all(needle in str(info.value) for needle in needles), str(info.value)


def test_preflight_plan_resolves_the_layout(make_cfg):
    plan = preflight(make_cfg("trainer.devices=4", "parallel.tensor_parallel_size=2"))
    assert (plan.data_parallel_size, plan.tensor_parallel_size, plan.world_size) == (2, 2, 4)
    assert plan.decoding == DecodingConfig() and plan.monitor == MonitorConfig()
    assert plan.resume is None and plan.init is None


def test_decoding_from_a_checkpoint_dict_fills_missing_keys_and_refuses_unknown_ones():
    assert DecodingConfig.from_dict({"strategy": "beam"}).beam == 4
    assert DecodingConfig.from_dict(None).beam == 1
    with pytest.raises(ConfigError, match="module.decoding has no option 'beams'"):
        DecodingConfig.from_dict({"beams": 3})


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    """A pickle that would create a file when unpickled: weights_only loading refuses it."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "crafted.ckpt"
    torch.save({"hyper_parameters": {"model_config": {}}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_info(path, "ckpt_path")
    assert not marker.exists()
