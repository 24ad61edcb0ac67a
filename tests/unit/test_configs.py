"""Every Hydra config composes and instantiates; overrides land (in-process: the CLI runs are in
cli/test_configs_cli.py)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from helpers.config import CONF_DIR, compose_train_config, text_overrides
from helpers.corpus import write_corpus as write_word_corpus
from mha_lightning.config import preflight
from mha_lightning.data import SyntheticDataModule, TextDataModule
from mha_lightning.errors import DataError
from mha_lightning.loggers import wandb_mode
from mha_lightning.model import Seq2SeqTransformer
from mha_lightning.module import Seq2SeqModule
from mha_lightning.preemption import PreemptionCheckpoint
from mha_lightning.train import build_callbacks, build_loggers

# The tiny model, smaller still: configs are what is under test here, not the model.
TINY = (
    "model.d_model=32",
    "model.num_heads=4",
    "model.ffn_dim=64",
    "data.num_train=64",
    "data.num_val=16",
    "data.num_test=16",
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def instantiate_run(cfg):
    """Build every component the way `mha-train` does (without fitting)."""
    plan = preflight(cfg)
    assert (plan.data_parallel_size, plan.tensor_parallel_size) == (1, 1)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    module = instantiate(cfg.module, model=model, _convert_="partial")
    loggers = build_loggers(cfg)
    callbacks = build_callbacks(cfg, plan.monitor)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    assert isinstance(datamodule, SyntheticDataModule | TextDataModule)
    assert isinstance(model, Seq2SeqTransformer) and isinstance(module, Seq2SeqModule)
    assert isinstance(trainer, L.Trainer)
    assert model.config.vocab_size == datamodule.vocab_size
    return datamodule, model, module, loggers, callbacks, trainer


def forward_one_batch(datamodule, model) -> None:
    batch = next(iter(datamodule.train_dataloader()))
    with torch.no_grad():
        logits = model(batch["src"], batch["tgt_in"])
    assert logits.shape == (*batch["tgt_in"].shape, datamodule.vocab_size)
    assert torch.isfinite(logits).all()


# ----------------------------------------------------------------------------- every group
def test_groups_are_discovered():
    # A new config group needs a test here (and in the list below).
    tested = {
        "model",
        "data",
        "module",
        "trainer",
        "logger",
        "callbacks",
        "monitor",
        "paths",
        "hydra",
        "experiment",
        "debug",
        "hparams_search",
    }
    assert {p.name for p in CONF_DIR.iterdir() if p.is_dir() and not p.name.startswith("_")} == tested
    assert {"tiny", "small", "base", "large"} <= set(options("model"))
    assert {"copy", "reverse", "sort", "pairswap", "synthetic", "text"} <= set(options("data"))
    assert {"wandb", "csv", "none"} <= set(options("logger"))


@pytest.mark.parametrize("name", options("model"))
def test_model_configs(make_cfg, name):
    cfg = make_cfg(f"model={name}", "logger=none")
    dm, model, module, *_ = instantiate_run(cfg)
    for key in ("d_model", "num_heads", "num_encoder_layers", "num_decoder_layers", "ffn_dim", "norm_first"):
        assert getattr(model.config, key) == cfg.model[key], key
    assert model.config.head_dim == cfg.model.d_model // cfg.model.num_heads
    assert model.config.vocab_size == cfg.data.vocab_size
    assert module.model is model
    if name == "base":
        assert (model.config.d_model, model.config.num_encoder_layers, model.config.ffn_dim) == (512, 6, 2048)
    if name == "large":  # Vaswani et al.'s big
        assert (model.config.d_model, model.config.num_heads, model.config.ffn_dim) == (1024, 16, 4096)
        assert (model.config.num_encoder_layers, model.config.num_decoder_layers) == (6, 6)
    forward_one_batch(dm, model)


@pytest.mark.parametrize("name", [n for n in options("data") if n != "text"])
def test_synthetic_data_configs(make_cfg, name):
    cfg = make_cfg(f"data={name}", "logger=none", *TINY)
    dm, model, *_ = instantiate_run(cfg)
    assert isinstance(dm, SyntheticDataModule)
    assert dm.task == ("reverse" if name == "synthetic" else name)
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [64, 16, 16]
    forward_one_batch(dm, model)


def write_corpus(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    de = ["ein kleiner hund", "eine katze schläft", "zwei männer laufen", "ein kind spielt im park"] * 5
    en = ["a small dog", "a cat sleeps", "two men run", "a child plays in the park"] * 5
    files = {"src": folder / "train.de", "tgt": folder / "train.en", "tsv": folder / "val.tsv"}
    files["src"].write_text("\n".join(de) + "\n", encoding="utf-8")
    files["tgt"].write_text("\n".join(en) + "\n", encoding="utf-8")
    long = " ".join(en[:4] * 6)  # a validation target longer than data.max_len and the model's reach
    files["tsv"].write_text(
        "".join(f"{d}\t{e}\n" for d, e in [*zip(de[:4], en[:4], strict=True), (de[0], long)]), encoding="utf-8"
    )
    return files


def test_text_data_config_with_real_files(make_cfg, tmp_path):
    files = write_corpus(tmp_path / "corpus")
    cfg = make_cfg(
        "data=text",
        "logger=none",
        "data.vocab_size=300",
        "data.batch_size=4",
        "data.max_len=24",
        "model.max_len=32",
        *TINY[:3],
        f"data.train.src={files['src']}",
        f"data.train.tgt={files['tgt']}",
        f"data.val.tsv={files['tsv']}",
    )
    assert cfg.model.vocab_size == 300
    dm, model, *_ = instantiate_run(cfg)
    assert isinstance(dm, TextDataModule) and dm.is_text
    dm.setup("fit")
    assert Path(cfg.data.tokenizer_path) == tmp_path / "run" / "tokenizer.json"
    assert Path(cfg.data.tokenizer_path).is_file()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [20, 5, 5]  # test falls back to val
    assert dm.tokenizer.vocab_size <= 300
    src_ids, tgt_ids = dm.splits["val"][1]
    assert dm.tokenizer.decode(tgt_ids) == "a cat sleeps"
    forward_one_batch(dm, model)
    # Validation keeps every sentence, truncated so that the teacher-forced pass fits the model.
    assert all(len(s) <= 24 and len(t) <= 24 for s, t in dm.splits["val"])
    assert len(dm.splits["val"][4][1]) == 24
    for batch in dm.val_dataloader():
        with torch.no_grad():
            assert model(batch["src"], batch["tgt_in"]).shape[1] == batch["tgt_in"].shape[1]


def test_text_data_config_without_files_fails_at_setup_naming_the_split(make_cfg):
    cfg = make_cfg("data=text", "logger=none", *TINY[:3])
    dm, *_ = instantiate_run(cfg)  # composing and building everything works: files are read at setup
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    assert "data.train" in str(info.value) and "\n" not in str(info.value)
    assert not Path(cfg.data.tokenizer_path).exists()


@pytest.mark.parametrize("name", options("module"))
def test_module_configs(make_cfg, name):
    cfg = make_cfg(f"module={name}", "logger=none", "trainer.max_steps=300", *TINY)
    _, model, module, *_ = instantiate_run(cfg)
    opt = module.configure_optimizers()
    optimizer = opt["optimizer"] if isinstance(opt, dict) else opt
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.module.optimizer.lr * 1 / 200)  # warmup step 0
    assert optimizer.defaults["betas"] == (0.9, 0.98)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    scheduler = opt["lr_scheduler"]["scheduler"]
    assert opt["lr_scheduler"]["interval"] == "step"
    factor = scheduler.lr_lambdas[0]
    assert factor(199) == pytest.approx(1.0)
    if name == "cosine":
        assert cfg.module.scheduler.total_steps == 300  # follows trainer.max_steps
        assert factor(299) < 1e-3
    else:
        assert factor(799) == pytest.approx(0.5)  # 1/sqrt(step / warmup)
    assert module.label_smoothing == 0.1 and module.decoding.strategy == "greedy"


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_configs(make_cfg, name):
    cfg = make_cfg(f"trainer={name}", "logger=none", *TINY)
    assert cfg.trainer.use_distributed_sampler is False and cfg.trainer.inference_mode is False
    if cfg.trainer.accelerator == "gpu":
        assert cfg.trainer.precision == "bf16-mixed"
        if not torch.cuda.is_available():
            pytest.skip("trainer=gpu instantiates only where CUDA is available")
    _, _, _, _, _, trainer = instantiate_run(cfg)
    assert trainer.max_steps == 1500 and trainer.val_check_interval == 250
    assert trainer.gradient_clip_val == 1.0
    assert trainer.default_root_dir == cfg.paths.output_dir
    if name == "default":
        assert isinstance(trainer.accelerator, L.pytorch.accelerators.CPUAccelerator)
        assert trainer.precision == "32-true"


@pytest.mark.parametrize("name", options("logger"))
def test_logger_configs(make_cfg, monkeypatch, name, tmp_path):
    monkeypatch.delenv("WANDB_MODE")
    cfg = make_cfg(f"logger={name}", *TINY)
    *_, loggers, _, trainer = instantiate_run(cfg)
    kinds = {"none": [], "csv": [CSVLogger], "wandb": [WandbLogger]}.get(name)
    assert kinds is not None, f"new logger config {name}: add it to this test"
    assert [type(lg) for lg in loggers] == kinds
    assert [type(lg) for lg in trainer.loggers] == kinds
    for lg in loggers:
        assert Path(lg.save_dir) == tmp_path / "run"
    # Building the wandb logger must not set WANDB_MODE for the rest of the process (DESIGN.md pitfall).
    assert "WANDB_MODE" not in os.environ


def test_wandb_mode_is_offline_unless_asked(monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode(None) == "offline"
    assert wandb_mode(True) == "offline"
    assert wandb_mode(False) == "online"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode(None) == "online"
    assert wandb_mode(True) == "offline"


@pytest.mark.parametrize("name", options("callbacks"))
def test_callbacks_configs(make_cfg, tmp_path, name):
    cfg = make_cfg(f"callbacks={name}", "logger=none", "monitor.enabled=false", *TINY)
    *_, callbacks, trainer = instantiate_run(cfg)
    checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    preemption = [c for c in callbacks if isinstance(c, PreemptionCheckpoint)]
    assert len(preemption) == 1  # every run stops cleanly on SIGTERM / SIGUSR1
    assert len(callbacks) == len(cfg.callbacks or {}) + 1
    if name == "default":
        assert len(checkpoints) == 1  # a checkpoint folder: the stopped step is saved into it
        assert Path(checkpoints[0].dirpath) == tmp_path / "run" / "checkpoints"
        assert checkpoints[0].monitor == "val/loss" and checkpoints[0].save_last
        assert trainer.checkpoint_callback is checkpoints[0]
    if name == "none":
        assert callbacks == preemption
        assert trainer.checkpoint_callback is None  # and Lightning added no ModelCheckpoint of its own


def test_monitor_config_adds_the_entropy_callback(make_cfg):
    from mha_lightning.monitor.callback import EntropyMonitor

    cfg = make_cfg("logger=none", "callbacks=default", *TINY)
    assert any(isinstance(c, EntropyMonitor) for c in build_callbacks(cfg, preflight(cfg).monitor))
    cfg = make_cfg("logger=none", "callbacks=default", "monitor.enabled=false", *TINY)
    assert not any(isinstance(c, EntropyMonitor) for c in build_callbacks(cfg, preflight(cfg).monitor))


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_configs(make_cfg, name, tmp_path):
    # Text experiments name no corpus (the user gives it): give them the test corpus.
    is_text = name.endswith("_text") or name == "translation"
    corpus = text_overrides(write_word_corpus(tmp_path / "corpus"))[1:] if is_text else []
    cfg = make_cfg(f"experiment={name}", "logger=none", *corpus)
    dm, model, *_ = instantiate_run(cfg)
    if name == "reverse_tiny":
        assert cfg.data.task == "reverse" and cfg.model.d_model == 64 and cfg.trainer.max_steps == 1500
    if name == "translation":  # what a translation user starts from (issue 24)
        assert cfg.model.d_model == 256 and cfg.data.max_tokens == 4096 and cfg.module.label_smoothing == 0.1
        assert cfg.module.test_decoding.strategy == "beam" and cfg.module.test_decoding.beam_size == 5
        assert cfg.callbacks.model_checkpoint.save_top_k == 5 and cfg.callbacks.model_checkpoint.monitor == "step"
    if corpus:
        dm.prepare_data()  # trains the BPE tokenizer
        dm.setup("fit")
    forward_one_batch(dm, model)


@pytest.mark.parametrize("name", options("debug"))
def test_debug_configs(make_cfg, name):
    cfg = make_cfg(f"debug={name}", "logger=none", *TINY)
    *_, trainer = instantiate_run(cfg)
    if name == "fast":
        assert cfg.test is False
        assert trainer.fast_dev_run is True
        assert trainer.max_steps == 1 and trainer.num_sanity_val_steps == 0


@pytest.mark.parametrize("name", options("hparams_search"))
def test_hparams_search_configs_build_every_job(tmp_path, name):
    """`mha-train hparams_search=<name>` is a sweep whose every job (for Optuna: every value) composes and builds."""
    overrides = [f"hparams_search={name}", "logger=none", *TINY[3:]]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        sweep = compose("train", overrides=overrides, return_hydra_config=True)
    assert sweep.hydra.mode == RunMode.MULTIRUN
    params = sweep.hydra.sweeper.get("params") or {}
    assert params, f"hparams_search/{name} sweeps nothing"
    parser = OverridesParser.create()
    axes = []
    for key, values in params.items():
        override = parser.parse_override(f"{key}={values}")
        if override.is_interval_sweep():  # an Optuna search space: both its ends
            space = override.value()
            axes.append([f"{key}={space.start}", f"{key}={space.end}"])
            continue
        axes.append(
            [f"{key}={v}" for v in override.sweep_string_iterator()]
            if override.is_sweep_override()
            else [f"{key}={values}"]
        )
    jobs = list(itertools.product(*axes))
    if "optuna" in sweep.hydra.sweeper._target_:
        # A search space, not a list of jobs: every value (interval ends) of each axis, the others at their first.
        jobs = [tuple(v if a is axis else a[0] for a in axes) for axis in axes for v in axis]
    assert len(jobs) > 1
    for job in jobs:
        cfg = compose_train_config(tmp_path / "run", [*overrides, *job])
        _, model, *_ = instantiate_run(cfg)
        for assignment in job:
            key, value = assignment.split("=", 1)
            if key.startswith("model.") and hasattr(model.config, key[6:]):
                assert str(getattr(model.config, key[6:])) == value
    if sweep.get("optimized_metric"):
        assert sweep.optimized_metric.startswith(("val/", "test/"))


def test_paths_config_follows_mha_log_dir(make_cfg, tmp_path):
    cfg = make_cfg()
    assert cfg.paths.log_dir == str(tmp_path / "logs")  # conftest sets MHA_LOG_DIR
    assert cfg.paths.output_dir == str(tmp_path / "run")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        full = compose("train", overrides=["task_name=demo"], return_hydra_config=True)
    run_dir = Path(full.hydra.run.dir)
    assert run_dir.parent == tmp_path / "logs" / "demo" / "runs"
    assert Path(full.hydra.sweep.dir).parent == tmp_path / "logs" / "demo" / "multiruns"
    assert full.hydra.job.chdir is False


# ----------------------------------------------------------------------------- overrides
def test_overrides_land(make_cfg):
    cfg = make_cfg("model=small", "data=reverse", "trainer.max_steps=500", "seed=1")
    assert (cfg.model.d_model, cfg.model.num_heads, cfg.model.num_encoder_layers) == (256, 8, 3)
    assert cfg.model._target_ == "mha_lightning.model.Seq2SeqTransformer"
    assert cfg.data.task == "reverse"
    assert cfg.trainer.max_steps == 500
    assert cfg.seed == 1 and cfg.data.seed == 1


def test_head_dim_override_propagates(make_cfg):
    cfg = make_cfg("model.head_dim=16", "logger=none", "data.num_train=64")
    _, model, *_ = instantiate_run(cfg)
    assert model.config.head_dim == 16
    for attn in model.attention_layers()["cross"]:
        assert attn.head_dim == 16 and attn.q.weight.shape == (64, 64)  # 4 heads x 16, d_model 64


def test_model_vocab_follows_data_vocab(make_cfg):
    cfg = make_cfg("data.vocab_size=40", "logger=none", *TINY)
    assert cfg.model.vocab_size == 40
    dm, model, *_ = instantiate_run(cfg)
    assert model.output.out_features == 40 and dm.vocab_size == 40
    assert make_cfg("data=text").model.vocab_size == 8000


# ----------------------------------------------------------------------------- user-facing combinations
def test_sweep_config_with_a_non_wandb_logger_builds_only_real_loggers(make_cfg):
    # hparams_search=num_heads sets logger.wandb.group; with logger=csv that leaves a bare node.
    cfg = make_cfg("hparams_search=num_heads", "logger=csv")
    loggers = build_loggers(cfg)
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger"]


def test_readme_text_command_composes_with_test_files(make_cfg, tmp_path):
    files = write_word_corpus(tmp_path / "corpus")
    test_tsv = tmp_path / "corpus" / "test.tsv"
    test_pairs = [("der hund", "the dog"), ("ein rote auto", "a red car"), ("die katze schläft", "the cat sleeps")]
    test_tsv.write_text("".join(f"{s}\t{t}\n" for s, t in test_pairs), encoding="utf-8")
    cfg = make_cfg(*text_overrides(files), f"data.test.tsv={test_tsv}")
    assert cfg.data.test.tsv == str(test_tsv)
    # ... and the data module reads its test split from that file (not the validation fallback).
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert [len(dm.splits[s]) for s in ("val", "test")] == [40, len(test_pairs)]
    assert [dm.tokenizer.decode(t) for _, t in dm.splits["test"]] == [t for _, t in test_pairs]


def test_over_long_evaluation_pairs_are_counted_in_a_warning(make_cfg, tmp_path, caplog):
    files = write_word_corpus(tmp_path / "corpus")
    cfg = make_cfg(
        "data=text",
        "logger=none",
        "data.vocab_size=300",
        "data.max_len=3",
        f"data.train.src={files['src']}",
        f"data.train.tgt={files['tgt']}",
        f"data.val.tsv={files['tsv']}",
    )
    dm = instantiate(cfg.data)
    with caplog.at_level("WARNING", logger="mha_lightning.data.datamodule"):
        dm.setup("validate")
    sources, targets = (dm.tokenizer.encode_batch(column) for column in _val_columns(files))
    longer = sum(len(s) > 3 or len(t) > 3 for s, t in zip(sources, targets, strict=True))
    assert longer > 0
    (warning,) = [r.getMessage() for r in caplog.records if "longer than data.max_len" in r.getMessage()]
    assert warning.startswith(f"{longer} of 40 val pairs")
    assert all(len(s) <= 3 and len(t) <= 3 for s, t in dm.splits["val"])


def _val_columns(files) -> tuple[list[str], list[str]]:
    pairs = [line.split("\t") for line in files["tsv"].read_text(encoding="utf-8").splitlines()]
    return [s for s, _ in pairs], [t for _, t in pairs]
