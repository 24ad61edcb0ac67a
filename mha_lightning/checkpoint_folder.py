"""Sharded checkpoint folders that are visible only when complete, and checked before every load.

A sharded checkpoint (written under ``ModelParallelStrategy``) is a ``torch.distributed.checkpoint``
folder: one ``__<rank>_<n>.distcp`` file per writer, DCP's ``.metadata`` and Lightning's ``meta.pt``.
Every rank writes its shards into a hidden staging folder beside the target; once all are written,
rank 0 adds :data:`MANIFEST` (the step and, per file, its size and a fingerprint) and renames the
staging folder onto the target (:func:`publish`). A reader checks the manifest first
(:func:`verify`): a folder whose save never finished, a torn shard or shards of another step are
refused in one line, never loaded. DCP's ``.metadata`` is a pickle, so it is unpickled here with an
allow-list before DCP's own (unrestricted) reader ever sees it (docs/design.md, "Checkpoints").
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from mha_lightning.atomic import atomic_file, fsync_path, sibling_path
from mha_lightning.errors import CheckpointError, first_line

MANIFEST = "manifest.json"
FORMAT = "mha_lightning.sharded/1"
DCP_METADATA = ".metadata"
# Bytes hashed at each end of a file: shards of two steps differ in their first tensors' bytes,
# and reading a few MiB keeps the check cheap for any checkpoint size.
_SAMPLE = 1 << 20


def fingerprint(path: Path) -> dict[str, object]:
    """Size and a hash of the file's size, first and last MiB (the whole file when small)."""
    size = path.stat().st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with path.open("rb") as f:
        digest.update(f.read(_SAMPLE))
        if size > 2 * _SAMPLE:
            f.seek(-_SAMPLE, os.SEEK_END)
        digest.update(f.read(_SAMPLE))
    return {"size": size, "blake2b": digest.hexdigest()}


def write_manifest(folder: Path, global_step: int) -> None:
    """Seal a fully written folder: fsync its files, then write :data:`MANIFEST` (itself atomically)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    for p in files:
        fsync_path(p)
    manifest = {"format": FORMAT, "global_step": int(global_step), "files": {p.name: fingerprint(p) for p in files}}
    with atomic_file(folder / MANIFEST, "w", durable=True) as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def publish(staging: Path, target: Path, global_step: int) -> None:
    """Seal ``staging`` and rename it onto ``target``; the previous ``target`` goes once the new one is in place.

    Two renames: the old checkpoint moves aside, the new one moves in. A kill between them leaves
    both complete and hidden; :func:`hidden_candidates` lets a resume find them."""
    write_manifest(staging, global_step)
    aside = sibling_path(target, "old") if target.exists() or target.is_symlink() else None
    if aside is not None:
        os.rename(target, aside)
    os.rename(staging, target)
    fsync_path(target.parent, directory=True)
    for leftover in [aside, *hidden_candidates(target)]:
        if leftover is not None:
            remove(leftover)


def publish_file(written: Path, target: Path) -> None:
    """Rename the complete file ``written`` onto ``target``, a sharded folder of the same name: the folder
    moves aside first (one rename cannot replace a folder with a file) and goes once the file is in place."""
    aside = sibling_path(target, "old")
    os.rename(target, aside)
    os.rename(written, target)
    fsync_path(target.parent, directory=True)
    remove(aside)


def hidden_candidates(target: Path) -> list[Path]:
    """Staging and set-aside folders of ``target`` left by a save that was killed."""
    return sorted(p for p in target.parent.glob(f".{target.name}.*-*") if p.is_dir())


def remove(path: Path) -> None:
    """Remove a file or folder, ignoring what is already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def verify(folder: Path) -> int:
    """Check a sharded folder against its manifest and DCP's metadata -> the step it holds.

    Raises :class:`CheckpointError` (one line) for an unfinished save, a torn or foreign shard,
    shards of different steps, or a ``.metadata`` that would need more than plain data to unpickle."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{folder} has no {MANIFEST}: its save did not finish (or an older mha_lightning wrote it); "
            "use another checkpoint"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files, step = dict(manifest["files"]), int(manifest["global_step"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path} is not a valid manifest ({e}); use another checkpoint") from None
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST}
    unlisted = sorted(present - set(files))
    if unlisted:
        shown = ", ".join(unlisted[:3])
        raise CheckpointError(f"{folder} holds files its manifest does not list ({shown}): a mix of saves")
    for name, expected in files.items():
        path = folder / name
        if name not in present:
            raise CheckpointError(f"{folder} is missing {name}; the checkpoint is incomplete")
        if fingerprint(path) != expected:
            raise CheckpointError(
                f"{path} is not the file its manifest lists (torn, or from another save of step != {step}); "
                "use another checkpoint"
            )
    if DCP_METADATA not in files:
        raise CheckpointError(f"{folder} has no {DCP_METADATA}; is it a sharded mha-train checkpoint?")
    check_metadata(folder / DCP_METADATA)
    return step


# DCP's metadata is dataclasses of plain values: the only globals its pickle may name.
_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata",)
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("copyreg", "_reconstructor"),
    ("builtins", "object"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if module in _ALLOWED_MODULES or (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it would load {module}.{name}")


def check_metadata(path: Path) -> None:
    """Unpickle DCP's ``.metadata`` with an allow-list: a crafted one is refused before it runs anything."""
    try:
        _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as e:  # noqa: BLE001 - any failure means: not DCP metadata we trust
        raise CheckpointError(f"refusing {path} ({first_line(e)}); only plain checkpoint metadata is loaded") from None
