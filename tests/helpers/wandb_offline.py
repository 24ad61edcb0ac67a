"""Read wandb offline run files (``wandb/offline-run-*/run-<id>.wandb``) without syncing.

A test helper: the end-to-end tests read back what a run logged to W&B with it.

wandb has no public reader for these files; the format below was checked against files
written by wandb 0.31 (the Go ``wandb-core`` backend):

* a 7-byte file header: ``b":W&B"``, magic ``0xBEE1`` (u16 little-endian), version ``0``;
* then a LevelDB log: 32 KiB blocks (counted from file offset 0, so block 0 includes the
  file header) of chunks, each with a 7-byte header ``crc32 u32 LE, length u16 LE, type u8``
  (1 full, 2 first, 3 middle, 4 last). The checksum is plain zlib CRC-32 of the type byte
  followed by the data (not LevelDB's masked CRC-32C). A block tail shorter than 7 bytes
  is zero padding;
* each reassembled chunk sequence is a serialized ``wandb_internal_pb2.Record``.

Logged values are JSON in ``value_json``. wandb-core flattens dict values (including media
such as ``wandb.Image``) into multi-part ``nested_key`` paths, while a key such as
``"train/loss"`` is a one-part path. The readers here rebuild the nesting from those paths, so
``{"img": wandb.Image(...)}`` reads back as ``{"img": {"_type": "image-file", ...}}`` and
``"train/loss"`` stays a flat key.
"""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mha_lightning.errors import DataError

if TYPE_CHECKING:
    from wandb.proto.wandb_internal_pb2 import Record

__all__ = [
    "find_run_files",
    "read_history",
    "read_records",
    "read_run_info",
    "read_summary",
]

_FILE_HEADER = struct.Struct("<4sHB")
_FILE_IDENT = b":W&B"
_FILE_MAGIC = 0xBEE1
_FILE_VERSION = 0

_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK_LEN = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_TYPE_CRC = {t: zlib.crc32(bytes([t])) for t in (_FULL, _FIRST, _MIDDLE, _LAST)}

# wandb's own bookkeeping entry in config and summary (telemetry, runtime); not user data.
_INTERNAL_KEY = "_wandb"


def find_run_files(root: str | Path) -> list[Path]:
    """All ``run-*.wandb`` files under ``root`` (recursive), sorted."""
    return sorted(p for p in Path(root).rglob("run-*.wandb") if p.is_file())


def read_records(path: str | Path) -> Iterator[Record]:
    """Yield the protobuf ``Record``s of a run file in order.

    The header is checked at call time: a file that is not a wandb run file raises
    ``ValueError`` (a ``DataError``). A truncated tail (a run still being written) ends the
    iteration silently; a corrupt chunk ends it with a ``RuntimeWarning``.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(_FILE_HEADER.size)
    except OSError as e:
        raise DataError(f"cannot read wandb run file {path}: {e.strerror or e}") from e
    if len(head) < _FILE_HEADER.size:
        raise DataError(f"{path} is not a wandb run file (only {len(head)} bytes, no header)")
    ident, magic, version = _FILE_HEADER.unpack(head)
    if ident != _FILE_IDENT or magic != _FILE_MAGIC:
        raise DataError(f"{path} is not a wandb run file (bad header {head!r})")
    if version != _FILE_VERSION:
        raise DataError(f"{path} uses wandb run file version {version}; only {_FILE_VERSION} is supported")
    return _iter_records(path)


def _iter_records(path: Path) -> Iterator[Record]:
    from google.protobuf.message import DecodeError
    from wandb.proto.wandb_internal_pb2 import Record

    def corrupt(offset: int, why: str) -> None:
        warnings.warn(
            f"{path}: corrupt record at byte {offset} ({why}); stopped reading there",
            RuntimeWarning,
            stacklevel=2,
        )

    with path.open("rb") as f:
        block = f.read(_BLOCK_LEN)
        block_start = 0
        pos = _FILE_HEADER.size
        pending: bytearray | None = None
        pending_start = 0
        while True:
            if len(block) - pos < _CHUNK_HEADER.size:
                if len(block) < _BLOCK_LEN:  # end of file (possibly mid-write)
                    return
                block = f.read(_BLOCK_LEN)  # skip the zero padding of the block tail
                block_start += _BLOCK_LEN
                pos = 0
                continue
            offset = block_start + pos
            crc, length, rtype = _CHUNK_HEADER.unpack_from(block, pos)
            end = pos + _CHUNK_HEADER.size + length
            if end > len(block):
                if len(block) < _BLOCK_LEN:  # chunk cut off by end of file
                    return
                return corrupt(offset, f"chunk of {length} bytes overruns its block")
            if rtype == 0 and length == 0:  # zero-filled rest of block (LevelDB preallocation)
                if block.count(0, pos) != len(block) - pos:
                    return corrupt(offset, "zero chunk header")
                pos = len(block)
                continue
            if rtype not in _TYPE_CRC:
                return corrupt(offset, f"unknown chunk type {rtype}")
            data = block[pos + _CHUNK_HEADER.size : end]
            if zlib.crc32(data, _TYPE_CRC[rtype]) != crc:
                return corrupt(offset, "checksum mismatch")
            pos = end

            if rtype in (_FULL, _FIRST):
                if pending is not None:
                    return corrupt(pending_start, "fragmented record never finished")
                if rtype == _FIRST:
                    pending, pending_start = bytearray(data), offset
                    continue
                payload, payload_start = data, offset
            else:
                if pending is None:
                    return corrupt(offset, "continuation chunk without a first chunk")
                pending += data
                if rtype == _MIDDLE:
                    continue
                payload, payload_start, pending = bytes(pending), pending_start, None

            record = Record()
            try:
                record.ParseFromString(payload)
            except DecodeError as e:
                return corrupt(payload_start, f"bad protobuf: {e}")
            yield record


def _decode(value_json: str) -> Any:
    """Decode one ``value_json`` (wandb writes NaN/Infinity, which ``json`` accepts)."""
    if not value_json:
        return None
    try:
        return json.loads(value_json)
    except ValueError:
        return value_json


def _path(item: Any) -> list[str]:
    return list(item.nested_key) or [item.key]


def _set(out: dict[str, Any], path: list[str], value: Any) -> None:
    node = out
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def _remove(out: dict[str, Any], path: list[str]) -> None:
    node: Any = out
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)


def _apply(out: dict[str, Any], updates: Iterable[Any], removes: Iterable[Any] = ()) -> None:
    for item in updates:
        _set(out, _path(item), _decode(item.value_json))
    for item in removes:
        _remove(out, _path(item))


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """One dict per logged row, in file order: key -> decoded value, including ``_step``."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        _apply(row, record.history.item)
        if "_step" not in row and record.history.HasField("step"):
            row["_step"] = record.history.step.num
        rows.append(row)
    return rows


def read_run_info(path: str | Path) -> dict[str, Any]:
    """Run metadata: ``id, entity, project, name, group, job_type, notes, tags, config``.

    Later ``run`` records (e.g. after ``run.name = ...``) replace earlier ones; ``config``
    records are applied on top in order. Empty strings read as ``None``; wandb's internal
    ``_wandb`` config entry is dropped.
    """
    info: dict[str, Any] = {
        "id": None,
        "entity": None,
        "project": None,
        "name": None,
        "group": None,
        "job_type": None,
        "notes": None,
        "tags": [],
        "config": {},
    }
    config: dict[str, Any] = info["config"]
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            info.update(
                id=run.run_id or None,
                entity=run.entity or None,
                project=run.project or None,
                name=run.display_name or None,
                group=run.run_group or None,
                job_type=run.job_type or None,
                notes=run.notes or None,
                tags=list(run.tags),
            )
            _apply(config, run.config.update, run.config.remove)
        elif kind == "config":
            _apply(config, record.config.update, record.config.remove)
    config.pop(_INTERNAL_KEY, None)
    return info


def read_summary(path: str | Path) -> dict[str, Any]:
    """The run summary (last value per key); from history if the file has no summary records."""
    summary: dict[str, Any] = {}
    from_history: dict[str, Any] = {}
    seen_summary = False
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            seen_summary = True
            _apply(summary, record.summary.update, record.summary.remove)
        elif kind == "history" and not seen_summary:
            row: dict[str, Any] = {}
            _apply(row, record.history.item)
            from_history.update(row)
    result = summary if seen_summary else from_history
    result.pop(_INTERNAL_KEY, None)
    return result
