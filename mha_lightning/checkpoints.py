"""Reading checkpoints outside training: single files and sharded (DCP) folders alike.

A single-file checkpoint is Lightning's ``torch.save`` dict. A sharded one (written under
``ModelParallelStrategy``) is a ``torch.distributed.checkpoint`` folder holding the tensors
(``state_dict``, ``optimizer_0``...) plus ``meta.pt``, the rest of Lightning's dict. Only public
torch APIs read them here, so a Lightning release cannot change how evaluation loads a model.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mha_lightning.checkpoint_folder import verify
from mha_lightning.ema import EMA_PREFIX, buffer_name, parameter_names
from mha_lightning.errors import CheckpointError, exit_on_user_error, first_line

MODEL_PREFIX = "model."
WEIGHTS = ("raw", "ema")  # a checkpoint's trained weights, or their moving average (module.ema)
# The file in which Lightning's ModelParallelStrategy stores a sharded checkpoint's non-tensor part.
META_FILE = "meta.pt"
# Model settings that change parameter shapes: a checkpoint only fits a model that agrees on them.
SHAPE_KEYS = (
    "vocab_size",
    "d_model",
    "num_heads",
    "head_dim",
    "num_encoder_layers",
    "num_decoder_layers",
    "ffn_dim",
    "positional",
    "share_embeddings",
)


def _torch_load(path: Path) -> dict[str, Any]:
    """One torch file on CPU, memory-mapped (reading hyper-parameters does not page in every tensor).

    ``weights_only=True``: tensors and plain containers only, so a crafted file cannot run code."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a torn or foreign file: say which and why, in one line
        raise CheckpointError(f"cannot read checkpoint {path} ({first_line(e)}); is it a mha-train checkpoint?") from e
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a mha-train checkpoint")
    return checkpoint


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself, read once: where it is, its layout and hyper-parameters."""

    path: Path
    hparams: dict[str, Any]
    global_step: int = 0
    wandb_run_id: str | None = None  # the W&B run a resumed run continues

    @property
    def sharded(self) -> bool:
        """True for a DCP folder (written at tp or dp > 1), False for a single file."""
        return self.path.is_dir()

    @property
    def model_config(self) -> dict[str, Any]:
        """The ``Seq2SeqTransformer`` settings the checkpoint was trained with."""
        saved = self.hparams.get("model_config")
        if not saved:
            raise CheckpointError(f"{self.path} has no model_config; is it a mha-train checkpoint?")
        return dict(saved)

    @property
    def run_config(self) -> dict[str, Any]:
        """The resolved ``mha-train`` config of the run that wrote it ({} if none was recorded)."""
        return dict(self.hparams.get("run_config") or {})

    @property
    def decoding(self) -> dict[str, Any]:
        """The decoding settings the run validated and tested with."""
        return dict(self.hparams.get("decoding") or {})


def read_info(path: str | Path, key: str = "checkpoint") -> CheckpointInfo:
    """Read a checkpoint's hyper-parameters (a sharded folder's meta.pt, a file's header) once."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{key}={path} does not exist; pass a .ckpt file or a sharded checkpoint folder")
    if path.is_dir():
        sealed_step = verify(path)  # complete, one save, plain metadata: before anything is unpickled
        meta = path / META_FILE
        if not meta.is_file():
            raise CheckpointError(f"{path} has no {META_FILE}; is it a mha-train checkpoint folder?")
        checkpoint = _torch_load(meta)
        if int(checkpoint.get("global_step") or 0) != sealed_step:
            raise CheckpointError(f"{meta} is of step {checkpoint.get('global_step')}, its manifest of {sealed_step}")
    else:
        checkpoint = _torch_load(path)
    return CheckpointInfo(
        path,
        dict(checkpoint.get("hyper_parameters") or {}),
        int(checkpoint.get("global_step") or 0),
        checkpoint.get("wandb_run_id"),
    )


def newest_complete(folder: str | Path) -> tuple[CheckpointInfo | None, list[str]]:
    """The checkpoint of ``folder`` with the highest step that reads whole -> (it or None, skipped reasons).

    Candidates are ``*.ckpt`` files and sharded folders, and the complete hidden folders a sharded
    save killed between its two renames leaves (``checkpoint_folder.publish``); a torn, unfinished
    or foreign one is skipped, not fatal."""
    folder = Path(folder)
    found, skipped = [], []
    candidates = sorted(folder.glob("*.ckpt")) + sorted(p for p in folder.glob(".*.ckpt.*-*") if p.is_dir())
    for path in candidates if folder.is_dir() else []:
        try:
            found.append(read_info(path))
        except CheckpointError as e:
            if not path.name.startswith("."):  # an unfinished staging folder is no news
                skipped.append(f"{path.name} ({e})")
    # Highest step first; at equal steps a visible one, and last.ckpt (written after the others).
    found.sort(
        key=lambda info: (info.global_step, not info.path.name.startswith("."), info.path.name.startswith("last")),
        reverse=True,
    )
    return (found[0] if found else None), skipped


def check_compatible(info: CheckpointInfo, config: dict[str, Any], key: str = "ckpt_path") -> None:
    """Fail in one line, before training, when a checkpoint's model differs in shape from ``config``."""
    saved = info.model_config
    keys = SHAPE_KEYS + (("max_len",) if config.get("positional") == "learned" else ())
    differ = [
        f"model.{k}: checkpoint {saved.get(k)!r} vs config {config.get(k)!r}"
        for k in keys
        if saved.get(k) != config.get(k)
    ]
    if differ:
        raise CheckpointError(
            f"{key}={info.path} was trained with another model ({'; '.join(differ)}); "
            "use the checkpoint's model settings"
        )


def _load_sharded_weights(model: nn.Module, path: Path, weights: str = "raw") -> None:
    """Fill a single-device model from a DCP folder of any (dp, tp) layout: DCP reshards on load.
    ``weights="ema"``: the parameters from the folder's moving average, the other buffers as trained."""
    import torch.distributed.checkpoint as dcp

    state = {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}
    if weights == "ema":
        params = dict(model.named_parameters())
        for name, owner in parameter_names(model).items():  # a tied weight's other names too: loaded once
            state.pop(MODEL_PREFIX + name, None)
            state[EMA_PREFIX + buffer_name(owner)] = params[owner].data
    try:
        dcp.load({"state_dict": state}, checkpoint_id=path, no_dist=True)
    except (dcp.CheckpointException, Exception) as e:  # CheckpointException derives from BaseException
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(f"cannot read the weights of {path} ({reason}); use the same model config") from None


def load_model_weights(model: nn.Module, info: CheckpointInfo, weights: str = "raw") -> None:
    """Load a (single-device) model's weights from a checkpoint of any tp/dp layout: the trained ones
    (``weights="raw"``) or their moving average (``"ema"``, checkpoints of runs with ``module.ema``)."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"weights={weights!r} must be one of {list(WEIGHTS)}")
    if weights == "ema" and info.hparams.get("ema_decay") is None:
        raise CheckpointError(f"{info.path} holds no EMA weights (its run had module.ema.decay=null); use raw weights")
    if info.sharded:
        _load_sharded_weights(model, info.path, weights)
        return
    saved = _torch_load(info.path).get("state_dict")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{info.path} has no 'state_dict'; is it a mha-train checkpoint?")
    state = {k[len(MODEL_PREFIX) :]: v for k, v in saved.items() if k.startswith(MODEL_PREFIX)}
    if weights == "ema":
        for name, owner in parameter_names(model).items():  # a tied weight under each of its names
            key = EMA_PREFIX + buffer_name(owner)
            if key not in saved:
                raise CheckpointError(f"{info.path} has no EMA weight for {owner}; use raw weights")
            state[name] = saved[key]
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(
            f"checkpoint {info.path} does not fit the model ({first}); use the same model config"
        ) from None
    missing = [k for k in result.missing_keys if not k.endswith("sinusoid")]
    if missing or result.unexpected_keys:
        shown = (missing + result.unexpected_keys)[:3]
        raise CheckpointError(
            f"checkpoint {info.path} does not match the model ({len(missing)} missing, "
            f"{len(result.unexpected_keys)} unexpected keys, e.g. {shown}); use the same model config"
        )


def load_model(path: str | Path, key: str = "checkpoint", weights: str = "raw") -> tuple[nn.Module, CheckpointInfo]:
    """-> (the checkpoint's model, single-device, with its ``weights`` (raw or ema); its info)."""
    from mha_lightning.model import Seq2SeqTransformer

    info = read_info(path, key)
    model = Seq2SeqTransformer(**info.model_config)
    load_model_weights(model, info, weights)
    return model, info


# --------------------------------------------------------------------------- sharded folders, whole
# DCP keeps a checkpoint's nested dicts flattened ("optimizer_0.state.<param>.exp_avg"); its tensors are
# read into templates of the right shape, its few other values (optimizer settings) are pickles, unpickled
# here with weights_only=True where DCP's own planner would run whatever they say.


def _safe_load_planner():
    """DCP's default load planner over a flat state dict, its non-tensor values plain data only
    (defined here: importing torch.distributed.checkpoint costs seconds, which only loading needs)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    return SafeLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


def _read_dcp(path: Path, flat: dict[str, Any], no_dist: bool) -> None:
    """Fill ``flat`` (DCP's flattened keys -> tensors to load into, or placeholders) from folder ``path``."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(flat, checkpoint_id=path, planner=_safe_load_planner(), no_dist=no_dist)
    except (dcp.CheckpointException, Exception) as e:  # CheckpointException derives from BaseException
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(f"cannot read {path} ({reason}); use the same model config") from None


def load_sharded_checkpoint(path: str | Path) -> dict[str, Any]:
    """A sharded (DCP) folder of any (dp, tp) layout as the single-file checkpoint one device would
    have written: the whole model, the optimizer's state by parameter index, and everything else
    (``meta.pt``: loops, schedules, random streams). Lets a tp=1 run resume a sharded checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    verify(path)
    metadata = FileSystemReader(str(path)).read_metadata()
    flat: dict[str, Any] = {}
    for key, item in metadata.state_dict_metadata.items():
        size = getattr(item, "size", None)  # TensorStorageMetadata; bytes items have none
        flat[key] = torch.empty(size, dtype=item.properties.dtype) if size is not None else None
    _read_dcp(path, flat, no_dist=True)
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = metadata.planner_data[key]  # the nested path DCP flattened this key from
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    checkpoint = _torch_load(path / META_FILE)
    checkpoint["state_dict"] = nested.pop("state_dict")
    optimizers = sorted((k for k in nested if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    checkpoint["optimizer_states"] = [_by_index(nested[k]) for k in optimizers]
    return checkpoint


def _by_index(optimizer: dict[str, Any]) -> dict[str, Any]:
    """DCP's optimizer state (parameters by name, param groups as dicts keyed by position) -> torch's own
    (``Optimizer.load_state_dict``: parameters numbered in the groups' order)."""
    groups = [optimizer["param_groups"][i] for i in sorted(optimizer["param_groups"], key=int)]
    index: dict[str, int] = {}
    for group in groups:
        names = group["params"]
        group["params"] = list(range(len(index), len(index) + len(names)))
        index.update(zip(names, group["params"], strict=True))
    return {"state": {index[name]: state for name, state in optimizer.get("state", {}).items()}, "param_groups": groups}


def load_into_sharded(path: str | Path, model: nn.Module, optimizers: list) -> dict[str, Any]:
    """Load a sharded folder of any (dp, tp) layout into ``model`` (a sharded LightningModule) and its
    ``optimizers`` at this run's layout (DCP reshards) -> the rest of the checkpoint (``meta.pt``).
    A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    weights = get_model_state_dict(model)
    flat = {f"state_dict.{name}": tensor for name, tensor in weights.items()}
    states = [get_optimizer_state_dict(model, optimizer) for optimizer in optimizers]
    for i, state in enumerate(states):
        for name, values in state["state"].items():
            flat.update({f"optimizer_{i}.state.{name}.{key}": value for key, value in values.items()})
        for g, group in enumerate(state["param_groups"]):
            flat.update({f"optimizer_{i}.param_groups.{g}.{key}": value for key, value in group.items()})
    _read_dcp(path, flat, no_dist=False)
    set_model_state_dict(model, weights)
    for i, (optimizer, state) in enumerate(zip(optimizers, states, strict=True)):
        for name, values in state["state"].items():
            for key in values:
                values[key] = flat[f"optimizer_{i}.state.{name}.{key}"]
        for g, group in enumerate(state["param_groups"]):
            group.update({key: flat[f"optimizer_{i}.param_groups.{g}.{key}"] for key in group})
        set_optimizer_state_dict(model, optimizer, state)
    checkpoint = _torch_load(path / META_FILE)
    checkpoint.pop("state_dict", None)
    return checkpoint


def consolidate(src: str | Path, dst: str | Path, force: bool = False) -> Path:
    """Turn a sharded checkpoint folder into one file that loads anywhere (tp=1 included).

    The file holds the whole model and the folder's metadata; the optimizer state, stored per
    parameter shard, is left behind (a single-file checkpoint is for weights: ``init_from``, mha-eval).
    An existing ``dst`` is replaced only with ``force``."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a sharded checkpoint folder; only folders need consolidating")
    if dst.is_dir():
        raise CheckpointError(f"{dst} is a folder; name the single file to write, e.g. {dst / 'model.ckpt'}")
    if dst.exists() and not force:
        raise CheckpointError(f"{dst} exists; choose another output, or pass --force to replace it")
    model, _ = load_model(src)
    checkpoint = _torch_load(src / META_FILE)
    checkpoint["state_dict"] = {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}
    from mha_lightning.checkpoint_io import AtomicCheckpointIO  # Lightning: imported only when writing

    AtomicCheckpointIO().save_checkpoint(checkpoint, dst)
    return dst


@exit_on_user_error
def consolidate_main(argv: list[str] | None = None) -> int:
    """`mha-consolidate SHARDED_DIR OUT.ckpt [--force]`."""
    parser = argparse.ArgumentParser(prog="mha-consolidate", description=consolidate_main.__doc__)
    parser.add_argument("sharded_dir")
    parser.add_argument("output")
    parser.add_argument("--force", action="store_true", help="replace OUT.ckpt if it exists")
    args = parser.parse_args(argv)
    print(f"wrote {consolidate(args.sharded_dir, args.output, force=args.force)}")
    return 0


__all__ = ["CheckpointInfo", "check_compatible", "consolidate", "load_model", "load_model_weights", "read_info"]
