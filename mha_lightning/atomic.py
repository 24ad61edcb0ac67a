"""Files written whole or not at all: written beside the target under a fresh hidden name, then renamed
onto it, so a reader (or a resumed run) sees the previous file or the new one, never half of one.

The one way the package writes a file in place of another: checkpoint manifests, reports, records,
tokenizers, hypotheses (docs/design.md, "Checkpoints"). ``checkpoint_io.AtomicCheckpointIO`` adds
what a checkpoint needs on top (a folder in the way, one error line per failure) with the same names.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def sibling_path(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """A fresh hidden name beside ``path``: ``.<name>.<kind>-<pid>-<random>``.

    Beside the target, so the final rename stays on one filesystem; not ending in the target's
    suffix, so nothing that lists ``*.ckpt`` mistakes a leftover (after ``kill -9``) for a checkpoint."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_path(path: Path, directory: bool = False) -> None:
    """Flush a file (or a directory's entries) to disk; best effort where a platform cannot."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path`` (``durable``: the
    file and the directory entry flushed to disk first), on any exception it is removed and ``path`` is
    left as it was. The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_path(path)
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent, directory=True)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", durable: bool = False, **open_args: Any) -> Iterator[IO]:
    """``open(path, mode)`` whose content appears at ``path`` whole when the block ends, or not at all."""
    with atomic_path(path, durable) as tmp, open(tmp, mode, **open_args) as f:
        yield f


def write_text_atomic(path: str | os.PathLike, text: str, durable: bool = False) -> None:
    """``path.write_text(text)``, whole or not at all."""
    with atomic_file(path, "w", durable, encoding="utf-8") as f:
        f.write(text)
