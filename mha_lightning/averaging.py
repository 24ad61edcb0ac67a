"""`mha-average`: one checkpoint whose weights are the mean of several (fairseq's average_checkpoints.py).

    mha-average logs/train/runs/<time> --last 5 --output averaged.ckpt
    mha-average step000900.ckpt step001000.ckpt --output averaged.ckpt

With a run directory (or its ``checkpoints`` folder) and ``--last N``: the N step checkpoints of the highest
steps (``last.ckpt`` apart: it repeats one of them). Single files and sharded folders mix freely; all must
come from one model config. Every floating-point tensor of the state dict (the weights, and the EMA weights of
runs that keep them) is averaged, the rest taken from the newest; the result is a single-file checkpoint with
the newest one's hyper-parameters, which ``mha-eval``, ``mha-analyze`` and ``init_from`` read like any other.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from mha_lightning.checkpoints import META_FILE, CheckpointInfo, _torch_load, load_sharded_checkpoint, read_info
from mha_lightning.errors import CheckpointError, ConfigError, exit_on_user_error

LAST = "last"  # Lightning's last.ckpt: a copy of the newest step, not a step of its own


def step_checkpoints(run: Path) -> list[CheckpointInfo]:
    """The step checkpoints of a run directory (or of its checkpoints folder), lowest step first."""
    folder = run / "checkpoints" if (run / "checkpoints").is_dir() else run
    if not folder.is_dir():
        raise CheckpointError(f"{run} is neither a run directory nor a checkpoints folder")
    candidates = [p for p in sorted(folder.glob("*.ckpt")) if not p.name.startswith((LAST, "."))]
    infos = sorted((read_info(p) for p in candidates), key=lambda info: info.global_step)
    if not infos:
        raise CheckpointError(f"{folder} holds no step checkpoints (only {LAST}.ckpt or nothing)")
    return infos


def choose(paths: list[str], last: int | None) -> list[CheckpointInfo]:
    """The checkpoints to average: the newest ``last`` of one run directory, or the given paths."""
    if last is not None:
        if last < 1:
            raise ConfigError(f"--last must be at least 1 (checkpoints to average), got {last}")
        if len(paths) != 1:
            raise ConfigError(f"--last takes one run directory, got {len(paths)} paths")
        infos = step_checkpoints(Path(paths[0]))
        if len(infos) < last:
            raise CheckpointError(
                f"--last {last}: {paths[0]} keeps only {len(infos)} step checkpoints "
                f"({', '.join(i.path.name for i in infos)}); keep more with callbacks.model_checkpoint.save_top_k"
            )
        return infos[-last:]
    if not paths:
        raise ConfigError("name the checkpoints to average, or one run directory with --last N")
    return [read_info(p) for p in paths]


def _same_model(infos: list[CheckpointInfo]) -> None:
    first = infos[0].model_config
    for info in infos[1:]:
        differ = sorted(k for k in set(first) | set(info.model_config) if first.get(k) != info.model_config.get(k))
        if differ:
            k = differ[0]
            raise CheckpointError(
                f"cannot average checkpoints of different models: {infos[0].path} has model.{k}={first.get(k)!r}, "
                f"{info.path} has model.{k}={info.model_config.get(k)!r}"
            )


def _load(info: CheckpointInfo) -> dict[str, Any]:
    checkpoint = load_sharded_checkpoint(info.path) if info.sharded else _torch_load(info.path)
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{info.path} has no 'state_dict'; is it a mha-train checkpoint?")
    return checkpoint


def average(infos: list[CheckpointInfo]) -> dict[str, Any]:
    """The averaged checkpoint of ``infos`` (one model config), metadata from the newest."""
    _same_model(infos)
    newest = max(infos, key=lambda info: info.global_step)
    sums: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    meta: dict[str, Any] = {}
    for info in infos:  # one state dict in memory at a time, besides the running sums
        checkpoint = _load(info)
        state = checkpoint["state_dict"]
        if info is newest:  # its dtypes and metadata go into the result: read once, here
            dtypes = {k: v.dtype for k, v in state.items()}
            source = _torch_load(info.path / META_FILE) if info.sharded else checkpoint
            meta = {"hyper_parameters": source.get("hyper_parameters"), "epoch": source.get("epoch", 0)}  # no tensors
        if sums and state.keys() != sums.keys() | kept.keys():
            raise CheckpointError(f"{info.path} holds other tensors than {infos[0].path}; use the same model config")
        for key, value in state.items():
            if not value.is_floating_point():
                if info is newest:
                    kept[key] = value.clone()
                else:
                    kept.setdefault(key, value.clone())
                continue
            if key in sums and sums[key].shape != value.shape:
                raise CheckpointError(
                    f"cannot average {key}: {tuple(sums[key].shape)} in {infos[0].path}, {tuple(value.shape)} in "
                    f"{info.path}; average checkpoints of one model config"
                )
            # float64 sums: the mean of N fp32 tensors, rounded once.
            sums[key] = sums[key] + value.double() if key in sums else value.double().clone()
    state = {k: (v / len(infos)).to(dtypes[k]) for k, v in sums.items()} | kept
    return {
        "state_dict": state,
        "hyper_parameters": meta["hyper_parameters"],
        "global_step": newest.global_step,
        "epoch": meta["epoch"],
        "averaged_from": [str(info.path) for info in infos],
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mha-average", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("paths", nargs="+", help="checkpoints (files or sharded folders), or one run directory with --last")
    p.add_argument("--last", type=int, help="average the N step checkpoints of the highest steps in the run directory")
    p.add_argument("--output", type=Path, required=True, help="the single-file checkpoint to write")
    p.add_argument("--force", action="store_true", help="replace --output if it exists")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """`mha-average` entry point; exit code 2 on a user error."""
    args = _parser().parse_args(argv)
    if args.output.is_dir():
        raise ConfigError(f"--output {args.output} is a folder; name the single file to write")
    if args.output.exists() and not args.force:
        raise ConfigError(f"--output {args.output} exists; choose another, or pass --force to replace it")
    infos = choose(args.paths, args.last)
    checkpoint = average(infos)
    from mha_lightning.checkpoint_io import AtomicCheckpointIO  # Lightning: imported only when writing

    AtomicCheckpointIO().save_checkpoint(checkpoint, args.output)
    steps = ", ".join(str(info.global_step) for info in infos)
    print(f"wrote {args.output}: the mean of {len(infos)} checkpoints (steps {steps})")
    return 0
