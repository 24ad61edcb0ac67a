"""Reading checkpoints outside training: single files and sharded (DCP) folders alike."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from mha_lightning.errors import CheckpointError, UserError

MODEL_PREFIX = "model."


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint as one dict on CPU, whether a file or a sharded folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a .ckpt file or a sharded checkpoint folder")
    try:
        if path.is_dir():
            from lightning.fabric.utilities.load import _load_distributed_checkpoint

            return _load_distributed_checkpoint(path)
        # mmap: reading the hyper-parameters or one state dict does not page in every tensor.
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except UserError:
        raise
    except Exception as e:  # a torn or foreign file: say which and why, in one line
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path} ({reason}); is it a mha-train checkpoint?") from e


# Model settings that change parameter shapes: a checkpoint only fits a model that agrees on them.
SHAPE_KEYS = ("vocab_size", "d_model", "num_heads", "head_dim", "num_encoder_layers", "num_decoder_layers",
              "ffn_dim", "positional", "share_embeddings")


def read_hparams(path: str | Path) -> dict[str, Any]:
    """A checkpoint's hyper_parameters, reading as little as possible (a sharded folder's meta.pt)."""
    path = Path(path)
    if path.is_dir():
        from lightning.fabric.utilities.load import _METADATA_FILENAME

        meta = path / _METADATA_FILENAME
        if not meta.is_file():
            raise CheckpointError(f"{path} has no {_METADATA_FILENAME}; is it a mha-train checkpoint folder?")
        checkpoint = load_checkpoint(meta)
    else:
        checkpoint = load_checkpoint(path)
    return checkpoint.get("hyper_parameters") or {}


def run_config(path: str | Path) -> dict[str, Any]:
    """The resolved run config saved with a checkpoint."""
    return read_hparams(path).get("run_config") or {}


def check_compatible(path: str | Path, config: dict[str, Any], key: str = "ckpt_path") -> None:
    """Fail in one line, before training, when a checkpoint's model differs in shape from ``config``."""
    saved = read_hparams(path).get("model_config")
    if not saved:
        raise CheckpointError(f"{key}={path} has no model_config; is it a mha-train checkpoint?")
    keys = SHAPE_KEYS + (("max_len",) if config.get("positional") == "learned" else ())
    differ = [f"model.{k}: checkpoint {saved.get(k)!r} vs config {config.get(k)!r}" for k in keys
              if saved.get(k) != config.get(k)]
    if differ:
        raise CheckpointError(f"{key}={path} was trained with another model ({'; '.join(differ)}); "
                              "use the checkpoint's model settings")


def model_state(checkpoint: dict[str, Any], path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} has no 'state_dict'; is it a mha-train checkpoint?")
    return {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}


def model_config(checkpoint: dict[str, Any], path: str | Path = "checkpoint") -> dict[str, Any]:
    hparams = checkpoint.get("hyper_parameters") or {}
    if "model_config" not in hparams:
        raise CheckpointError(f"{path} has no model_config in its hyper_parameters; is it a mha-train checkpoint?")
    return dict(hparams["model_config"])


def load_model_weights(model: nn.Module, path: str | Path, checkpoint: Optional[dict] = None) -> None:
    """Load a (single-device) model's weights from a checkpoint of any tp/dp layout."""
    checkpoint = checkpoint if checkpoint is not None else load_checkpoint(path)
    state = model_state(checkpoint, path)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"checkpoint {path} does not fit the model ({first}); use the same model config") from None
    missing = [k for k in result.missing_keys if not k.endswith("sinusoid")]
    if missing or result.unexpected_keys:
        shown = (missing + result.unexpected_keys)[:3]
        raise CheckpointError(
            f"checkpoint {path} does not match the model ({len(missing)} missing, "
            f"{len(result.unexpected_keys)} unexpected keys, e.g. {shown}); use the same model config"
        )


def consolidate(src: str | Path, dst: str | Path) -> Path:
    """Turn a sharded checkpoint folder into one file that loads anywhere (tp=1 included)."""
    checkpoint = load_checkpoint(src)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # DCP stores optimizer states keyed by parameter name; a single-file checkpoint is for weights.
    for key in [k for k in checkpoint if k.startswith("optimizer")]:
        checkpoint.pop(key)
    torch.save(checkpoint, dst)
    return dst


def consolidate_main(argv: Optional[list[str]] = None) -> int:
    """`mha-consolidate SHARDED_DIR OUT.ckpt`."""
    parser = argparse.ArgumentParser(prog="mha-consolidate", description=consolidate_main.__doc__)
    parser.add_argument("sharded_dir")
    parser.add_argument("output")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {consolidate(args.sharded_dir, args.output)}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
