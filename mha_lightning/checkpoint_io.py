"""Single-file checkpoints that appear only when complete (docs/design.md, "Checkpoints").

Lightning's ``TorchCheckpointIO`` writes the new file in a temporary place and then moves it
onto the target. When that place (``$TMPDIR``) is on another filesystem the move is a copy into
the target itself, so a ``kill -9`` or a full disk during it leaves a torn ``last.ckpt``: the only
good checkpoint of the run is gone. :class:`AtomicCheckpointIO` writes beside the target instead
and renames within the directory, which is atomic: readers see the previous checkpoint, whole,
until the new one is complete and flushed to disk.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mha_lightning.errors import CheckpointError


def temporary_path(path: str | os.PathLike) -> Path:
    """A fresh name for writing ``path``: hidden, in ``path``'s own directory (so the final rename
    stays on one filesystem), unique per process and call: ``.<name>.tmp-<pid>-<random>``.

    It does not end in the checkpoint's suffix, so nothing that lists ``*.ckpt`` mistakes a
    leftover (after ``kill -9``) for a checkpoint."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose single-file save never tears the previous checkpoint.

    ``save_checkpoint`` writes with ``torch.save`` to :func:`temporary_path` (same directory),
    flushes and fsyncs it, ``os.replace``\\ s it onto the target and fsyncs the directory (best
    effort). If anything fails the temporary file is removed and the target is left as it was:
    an ``OSError`` (disk full, read-only filesystem, not a directory, ...) becomes one
    :class:`~mha_lightning.errors.CheckpointError` line naming the path; any other exception
    (e.g. an object that cannot be pickled) propagates unchanged. Loading and removing are
    Lightning's. Paths on remote filesystems (``s3://`` ...) are left to Lightning's own save,
    as there is no local rename to make atomic (docs/design.md, "Checkpoints").
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically; the previous file at ``path`` stays intact on failure."""
        local = _local_path(path)
        if local is None or storage_options is not None:
            # Remote targets, and the TypeError Lightning raises for storage_options.
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(local)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            pass  # a non-directory in the way: creating the temporary file below says "Not a directory"
        except OSError as e:
            raise _write_error(target, e) from e
        tmp = temporary_path(target)
        try:
            # Buffered: its write() writes everything or raises (a raw write may write less, and
            # torch.save does not check). Created with the umask, like any new file; closed below.
            f = open(tmp, "xb")
        except OSError as e:
            raise _write_error(target, e) from e
        try:
            with f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException as e:
            _remove_quietly(tmp)
            cause = _os_error(e) if isinstance(e, Exception) else None  # Ctrl-C stays Ctrl-C
            if cause is not None:
                raise _write_error(target, cause) from e
            raise
        _fsync_directory(target.parent)


def _local_path(path: Any) -> str | None:
    """``path`` on the local filesystem (``file://`` stripped), or None for a remote URL."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, stripped = fsspec.core.url_to_fs(str(path))
    return stripped if isinstance(fs, LocalFileSystem) else None


def _os_error(error: BaseException) -> OSError | None:
    """The ``OSError`` behind ``error``: itself, or one it was raised from or while handling.

    ``torch.save`` may report a failed write to its file (ENOSPC, EFBIG, EIO) as a ``RuntimeError``
    raised while handling the file's ``OSError``; whether closing the file then raises the
    ``OSError`` again depends on what was left in its buffer."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _write_error(target: Path, error: OSError) -> CheckpointError:
    reason = error.strerror or str(error) or type(error).__name__
    kept = "the previous checkpoint is intact" if target.exists() else "nothing was written"
    return CheckpointError(f"cannot write checkpoint {target} ({reason}); {kept}")


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; not every platform or filesystem can open or fsync a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
