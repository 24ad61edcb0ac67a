"""Typed schemas of the config groups that are ours, and the one preflight that validates a run.

The YAML files under ``conf/`` fill these in; each dataclass's defaults equal its default YAML
(a test holds them together), and each validates its own values in ``__post_init__`` with
one line naming the key. :func:`preflight` runs every check once, in the launching process,
before any worker starts (docs/design.md, "Configuration").
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mha_lightning.distributed.layout import ParallelConfig
from mha_lightning.errors import ConfigError
from mha_lightning.schema import from_mapping, positive_int

STRATEGIES = ("greedy", "beam")


@dataclass(frozen=True)
class DecodingConfig:
    """How validation, test and ``mha-eval`` decode (``module.decoding``)."""

    strategy: str = "greedy"
    beam_size: int = 4
    length_penalty: float = 0.6
    max_extra_len: int = 10  # decode at most source length + this many tokens

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"module.decoding.strategy={self.strategy!r} must be one of {list(STRATEGIES)}")
        positive_int("module.decoding.beam_size", self.beam_size)
        positive_int("module.decoding.max_extra_len", self.max_extra_len)
        if not isinstance(self.length_penalty, (int, float)) or self.length_penalty < 0:
            raise ConfigError(f"module.decoding.length_penalty must be a number >= 0, got {self.length_penalty!r}")

    @property
    def beam(self) -> int:
        """The beam width decoding uses: 1 for greedy."""
        return self.beam_size if self.strategy == "beam" else 1

    @classmethod
    def from_dict(cls, values: DecodingConfig | Mapping[str, Any] | None) -> DecodingConfig:
        """From a config node or a checkpoint's saved dict (missing keys take the defaults)."""
        if isinstance(values, cls):
            return values
        return from_mapping(cls, values, "module.decoding")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, as saved in checkpoints."""
        return asdict(self)


# torch.compile's modes (its documented values).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileConfig:
    """``torch.compile`` of the model's training forward (``module.compile``; docs/design.md, "Compiling")."""

    enabled: bool = False  # off by default: on CPU it does not pay (docs/performance.md, "Training speed")
    backend: str = "inductor"  # any of torch.compiler.list_backends(exclude_tags=()), e.g. aot_eager to debug
    mode: str = "default"  # or reduce-overhead, max-autotune, max-autotune-no-cudagraphs

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"module.compile.enabled must be true or false, got {self.enabled!r}")
        if self.mode not in COMPILE_MODES:
            raise ConfigError(f"module.compile.mode={self.mode!r} must be one of {list(COMPILE_MODES)}")
        import torch

        backends = torch.compiler.list_backends(exclude_tags=())
        if self.backend not in backends:
            raise ConfigError(
                f"module.compile.backend={self.backend!r} is not a torch.compile backend; use one of "
                f"{sorted(set(backends) & {'inductor', 'aot_eager', 'eager', 'cudagraphs'})}"
            )

    @classmethod
    def from_dict(cls, values: CompileConfig | Mapping[str, Any] | None) -> CompileConfig:
        """From the ``module.compile`` config node (missing keys take the defaults)."""
        if isinstance(values, cls):
            return values
        return from_mapping(cls, values, "module.compile")


# What a non-finite training loss or gradient norm does: stop the run (default), or skip the step.
NONFINITE_POLICIES = ("stop", "skip")


def check_on_nonfinite(value: str) -> str:
    """``module.on_nonfinite`` if it is a policy, else the one-line ConfigError (preflight and the module)."""
    if value not in NONFINITE_POLICIES:
        raise ConfigError(f"module.on_nonfinite={value!r} must be one of {list(NONFINITE_POLICIES)}")
    return value


@dataclass(frozen=True)
class MonitorConfig:
    """The per-head entropy monitor (``monitor`` group); every field is a YAML key."""

    enabled: bool = True
    every_n_steps: int = 50  # measure the training batch every N optimizer steps
    collapse_threshold: float = 0.05  # warn when a head's normalised entropy falls below this
    probe: bool = True  # also measure a fixed validation probe set at each validation
    importance: bool = True  # and every head's importance on it (one forward and backward of the probe set)
    log_images: bool = True  # layer x head heatmaps to W&B at each measurement
    render_plots: bool = True  # PNG curves and heatmaps in <run>/plots at the end of training

    def __post_init__(self) -> None:
        positive_int("monitor.every_n_steps", self.every_n_steps)
        threshold = self.collapse_threshold
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"monitor.collapse_threshold must be a number in [0, 1], got {threshold!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> MonitorConfig:
        """From the ``monitor`` config node."""
        return from_mapping(cls, values, "monitor")


# The top-level keys mha-train reads (conf/train.yaml, its groups, a search's objective). `+foo=1` adds a key that
# reaches nothing and is refused, unless an interpolation reads it (`+corpus=/data data.train.tsv=${corpus}/train.tsv`).
SETTINGS = tuple(
    "task_name seed test ckpt_path resume init_from overwrite parallel model data module trainer logger callbacks "
    "monitor paths optimized_metric optimized_direction".split()
)
MAX_SEED = 2**32 - 1  # numpy's and Lightning's bound
_REFERENCE = re.compile(r"\$\{\s*([A-Za-z_]\w*)")


def _referenced(node: Any) -> set[str]:
    """The first key of every interpolation in ``node`` (``${corpus}/train.tsv`` -> corpus)."""
    if isinstance(node, Mapping):
        return set().union(*map(_referenced, node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*map(_referenced, node)) if node else set()
    return set(_REFERENCE.findall(node)) if isinstance(node, str) else set()


def _check_settings(cfg: Any) -> None:
    """One line for a top-level key nothing reads (``+foo=1``): Hydra's ``+`` adds any key, and this one would be
    ignored silently. Keys inside a component (``+trainer.profiler=simple``) reach it and are its to check."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=False)
    unknown = sorted(set(raw) - set(SETTINGS) - _referenced(raw))
    if unknown:
        raise ConfigError(
            f"{unknown[0]} is not a setting of mha-train (nothing reads it); a component's option goes inside its "
            f"group (e.g. +trainer.profiler=simple); the settings are: {', '.join(SETTINGS)}"
        )


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")


def _check_overwrite(c: Mapping[str, Any]) -> None:
    """``overwrite=true`` replaces the run in the folder (docs/design.md, "Run folders"): never what it resumes from."""
    overwrite = c.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise ConfigError(f"overwrite must be true or false, got {overwrite!r}")
    if not overwrite:
        return
    if c.get("resume") == "auto":
        raise ConfigError("set either resume=auto (continue the run in the folder) or overwrite=true (replace it)")
    folder = Path(str(c["paths"]["output_dir"])).resolve()
    for key in ("ckpt_path", "init_from"):
        if c.get(key) and folder in Path(str(c[key])).resolve().parents:
            raise ConfigError(
                f"{key}={c[key]} lies in the run folder that overwrite=true clears; copy it out first, or drop "
                "overwrite=true"
            )


def model_kwargs(node: Mapping[str, Any]) -> dict[str, Any]:
    """A ``model`` config node as ``Seq2SeqTransformer`` keyword arguments (no Hydra keys)."""
    return {k: v for k, v in node.items() if not str(k).startswith("_")}


def existing_path(key: str, value: Any) -> Path | None:
    """``value`` as a Path that must exist, or None when unset."""
    if value is None:
        return None
    path = Path(str(value))
    if not path.exists():
        raise ConfigError(f"{key}={value} does not exist; point it at a checkpoint file or sharded checkpoint folder")
    return path


def instantiate(node: Any, *, config_key: str | None = None, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, but a UserError raised by the target reaches the user as itself
    (Hydra wraps it in an InstantiationException with a stack-trace hint), and, given the node's ``config_key``,
    an option the target does not take (``+trainer.foo=1``) is one line naming it."""
    import hydra
    from hydra.errors import InstantiationException

    from mha_lightning.errors import UserError

    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e.__cause__))
        if config_key is not None and isinstance(e.__cause__, TypeError) and unknown:
            raise ConfigError(
                f"{config_key}.{unknown[1]}: {node.get('_target_')} has no option {unknown[1]!r}; check its spelling"
            ) from None
        raise


@dataclass(frozen=True)
class RunPlan:
    """Everything ``train()`` needs to know before it builds anything, validated once."""

    data_parallel_size: int
    tensor_parallel_size: int
    parallel: ParallelConfig
    decoding: DecodingConfig
    monitor: MonitorConfig
    resume: Any | None = None  # CheckpointInfo of ckpt_path
    init: Any | None = None  # CheckpointInfo of init_from

    @property
    def world_size(self) -> int:
        """Processes the run needs (dp x tp)."""
        return self.data_parallel_size * self.tensor_parallel_size


def _check_lengths(data: Mapping[str, Any], model: Mapping[str, Any]) -> None:
    data_max, model_max = data.get("max_len"), model.get("max_len")
    if isinstance(data_max, int) and isinstance(model_max, int) and data_max + 1 > model_max:
        raise ConfigError(
            f"data.max_len ({data_max}) + 1 (BOS/EOS) exceeds model.max_len ({model_max}); "
            "raise model.max_len or lower data.max_len"
        )


def _check_trainer(trainer: Mapping[str, Any]) -> None:
    max_steps = trainer.get("max_steps", -1)
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or (max_steps < 1 and max_steps != -1):
        raise ConfigError(f"trainer.max_steps must be a positive integer (or -1: train by epochs), got {max_steps!r}")
    positive_int("trainer.accumulate_grad_batches", trainer.get("accumulate_grad_batches", 1))
    precision, accelerator = str(trainer.get("precision", "32-true")), str(trainer.get("accelerator", "auto"))
    if precision.startswith("bf16") and _runs_on_cpu(accelerator):
        raise ConfigError(
            f"trainer.precision={precision} on a CPU is several times slower than fp32 (bf16 matrix products are "
            "emulated there); use trainer.precision=32-true on CPU, or trainer=gpu on a GPU machine"
        )


def _check_launcher_world(devices: int, num_nodes: int) -> None:
    """Under torchrun the processes exist before the config is read: trainer.devices and trainer.num_nodes must
    describe them. Otherwise a devices=1 config runs one whole job per process, all in one run directory, and
    other mismatches stop in Lightning with a traceback on every rank."""
    per_node, world = os.environ.get("LOCAL_WORLD_SIZE"), os.environ.get("WORLD_SIZE")  # torchrun sets both
    if per_node and per_node.isdigit() and int(per_node) != devices:
        error = ConfigError(
            f"trainer.devices ({devices}) must equal the processes torchrun starts on each node "
            f"(--nproc-per-node {per_node}); set trainer.devices={per_node}"
        )
    elif world and world.isdigit() and int(world) != devices * num_nodes:
        error = ConfigError(
            f"trainer.devices ({devices}) x trainer.num_nodes ({num_nodes}) = {devices * num_nodes} must equal the "
            f"launcher's world size ({world} processes); set trainer.num_nodes to the number of nodes "
            f"({int(world) // devices} with {devices} processes each)"
        )
    else:
        return
    error.every_rank = True  # every rank finds it: rank 0 says it once
    raise error


def _runs_on_cpu(accelerator: str) -> bool:
    if accelerator == "cpu":
        return True
    if accelerator == "auto":
        import torch

        return not torch.cuda.is_available()
    return False


def _check_optimisation(module: Mapping[str, Any]) -> None:
    """Build the optimizer and schedule once on a dummy parameter, before any worker exists:
    a bad lr or schedule then fails here in one line, not in every worker mid-setup."""
    import torch

    from mha_lightning.errors import UserError

    dummy = [torch.nn.Parameter(torch.zeros(1))]
    try:
        optimizer = instantiate(module["optimizer"])(params=dummy)
        if module.get("scheduler"):
            instantiate(module["scheduler"])(optimizer=optimizer)
    except UserError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"module.optimizer / module.scheduler: {e}") from None


def _checkpoint(key: str, value: Any, model: Mapping[str, Any]):
    from mha_lightning.checkpoints import check_compatible, read_info

    path = existing_path(key, value)
    if path is None:
        return None
    info = read_info(path, key)
    check_compatible(info, dict(model), key)
    return info


def _resume(c: Mapping[str, Any], model: Mapping[str, Any]):
    """The checkpoint to resume: ``ckpt_path``, or with ``resume=auto`` the run folder's newest complete one."""
    mode = c.get("resume")
    if mode not in (None, False, "auto"):
        raise ConfigError(f"resume={mode!r} must be auto or null (to resume a given checkpoint, set ckpt_path)")
    if mode != "auto":
        return _checkpoint("ckpt_path", c.get("ckpt_path"), model)
    if c.get("ckpt_path"):
        raise ConfigError("set either resume=auto or ckpt_path, not both")
    import logging

    from mha_lightning.checkpoints import check_compatible, newest_complete

    folder = Path(c["paths"]["output_dir"]) / "checkpoints"
    info, skipped = newest_complete(folder)
    log = logging.getLogger(__name__)
    for reason in skipped:
        log.warning("resume=auto: skipping %s", reason)
    if info is None:
        log.info("resume=auto: no checkpoint in %s; starting fresh", folder)
        return None
    check_compatible(info, dict(model), "resume=auto")
    log.info("resume=auto: resuming %s (step %d)", info.path, info.global_step)
    return info


def saved_layout(saved: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """The (dp, tp) of the run whose resolved config ``saved`` is (None if there is none)."""
    if not saved:
        return None
    trainer = saved.get("trainer") or {}
    return ParallelConfig.from_dict(saved.get("parallel")).sizes(trainer.get("devices", 1), trainer.get("num_nodes", 1))


def _note_resharding(info, dp: int, tp: int) -> None:
    """Say so when a checkpoint resumes at another layout than the one that wrote it (it reshards)."""
    written = saved_layout(info.run_config)
    if written is not None and written != (dp, tp):
        import logging

        logging.getLogger(__name__).info(
            "resuming %s, written at (dp=%d, tp=%d), at (dp=%d, tp=%d): weights and optimizer state are resharded",
            info.path,
            *written,
            dp,
            tp,
        )


def preflight(cfg: Any) -> RunPlan:
    """Validate a composed ``mha-train`` config once -> the run plan; one ``UserError`` line if anything is off.

    Reads each checkpoint's metadata once (never its tensors) and writes nothing."""
    from omegaconf import OmegaConf

    from mha_lightning.model import TransformerConfig

    _check_settings(cfg)
    c = OmegaConf.to_container(cfg, resolve=True)
    _check_seed(c.get("seed"))
    _check_overwrite(c)
    model = model_kwargs(c["model"])
    trainer = c.get("trainer") or {}
    _check_trainer(trainer)
    parallel = ParallelConfig.from_dict(c.get("parallel"))
    dp, tp = parallel.validate(model, trainer.get("devices", 1), trainer.get("num_nodes", 1))
    _check_launcher_world(trainer.get("devices", 1), trainer.get("num_nodes", 1))
    try:
        model = asdict(TransformerConfig(**model))  # the model's own checks, named model.<key>; head_dim resolved
    except TypeError as e:  # +model.foo=1: an option the model does not take
        from dataclasses import fields

        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        options = sorted(f.name for f in fields(TransformerConfig))
        raise ConfigError(f"model has no option {unknown[1] if unknown else e!r}; its options are {options}") from None
    _check_lengths(c.get("data") or {}, model)
    module = c.get("module") or {}
    check_on_nonfinite(module.get("on_nonfinite", "stop"))
    decoding = DecodingConfig.from_dict(module.get("decoding"))
    if CompileConfig.from_dict(module.get("compile")).enabled and tp > 1:
        # Measured on torch 2.13: dynamo fails on the tensor-parallel regions (before sequence parallelism
        # too: a RecursionError), so the run would stop at its first step (docs/design.md, "Compiling").
        raise ConfigError(
            f"module.compile.enabled=true needs parallel.tensor_parallel_size=1 (it is {tp}): torch.compile does "
            "not build the tensor-parallel model yet; set module.compile.enabled=false"
        )
    monitor = MonitorConfig.from_dict(c.get("monitor"))
    resume = _resume(c, model)
    if resume is not None:
        _note_resharding(resume, dp, tp)
    init = _checkpoint("init_from", c.get("init_from"), model)
    _check_optimisation(cfg.module)
    return RunPlan(dp, tp, parallel, decoding, monitor, resume, init)
