"""Checkpoints that appear only when complete, single files and sharded folders (docs/design.md, "Checkpoints").

Lightning's ``TorchCheckpointIO`` writes the new file in a temporary place and then moves it
onto the target. When that place (``$TMPDIR``) is on another filesystem the move is a copy into
the target itself, so a ``kill -9`` or a full disk during it leaves a torn ``last.ckpt``: the only
good checkpoint of the run is gone. :class:`AtomicCheckpointIO` writes beside the target instead
and renames within the directory, which is atomic: readers see the previous checkpoint, whole,
until the new one is complete and flushed to disk. :class:`AtomicModelParallelStrategy` does the
same for the sharded folders of tp/dp runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override

from mha_lightning.atomic import fsync_path, sibling_path
from mha_lightning.checkpoint_folder import publish, publish_file, remove
from mha_lightning.errors import CheckpointError, first_line


def temporary_path(path: str | os.PathLike) -> Path:
    """A fresh hidden name for writing ``path``, in its own directory: ``.<name>.tmp-<pid>-<random>``."""
    return sibling_path(path, "tmp")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose single-file save never tears the previous checkpoint.

    ``save_checkpoint`` writes with ``torch.save`` to :func:`temporary_path` (same directory),
    flushes and fsyncs it, ``os.replace``\\ s it onto the target and fsyncs the directory (best
    effort). If anything fails the temporary file is removed and the target is left as it was:
    an ``OSError`` (disk full, read-only filesystem, not a directory, ...) becomes one
    :class:`~mha_lightning.errors.CheckpointError` line naming the path; any other exception
    (e.g. an object that cannot be pickled) propagates unchanged. Loading and removing are
    Lightning's. Paths on remote filesystems (``s3://`` ...) are left to Lightning's own save,
    as there is no local rename to make atomic (docs/design.md, "Checkpoints"). Loading a sharded
    folder (written at any (dp, tp)) gives the single-file checkpoint of this one device (resharding).
    """

    @override
    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """A sharded folder as one device's checkpoint (``checkpoints.load_sharded_checkpoint``); a file as
        Lightning reads it."""
        if Path(str(path)).is_dir():
            from mha_lightning.checkpoints import load_sharded_checkpoint

            return load_sharded_checkpoint(path)
        if map_location is None:
            return super().load_checkpoint(path, weights_only=weights_only)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

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
            if target.is_dir() and not target.is_symlink():
                # A sharded run's folder of this name (a run resumed on one device): moved in like a folder.
                publish_file(tmp, target)
            else:
                os.replace(tmp, target)
        except BaseException as e:
            _remove_quietly(tmp)
            cause = None if isinstance(e, (KeyboardInterrupt, SystemExit)) else _os_error(e)  # Ctrl-C stays Ctrl-C
            if cause is not None:
                raise _write_error(target, cause) from e
            raise
        fsync_path(target.parent, directory=True)


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
    ``OSError`` again depends on what was left in its buffer. A sharded save's
    ``CheckpointException`` carries each rank's exception in ``failures``."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        for failed, _trace in getattr(error, "failures", {}).values():
            found = _os_error(failed)
            if found is not None:
                return found
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


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` whose sharded checkpoints appear only when complete.

    Lightning rewrites a sharded folder in place, so a kill during the save leaves a mix of old
    and new (or empty) shards under the only checkpoint's name. Here every rank writes into one
    hidden staging folder beside the target (its name chosen by rank 0), all ranks agree the
    write succeeded, and rank 0 seals and renames it onto the target
    (:func:`~mha_lightning.checkpoint_folder.publish`). A failure anywhere leaves the previous
    checkpoint as it was and is one :class:`~mha_lightning.errors.CheckpointError` line on every
    rank (docs/design.md, "Checkpoints"). A sharded folder of any (dp, tp) layout loads at this run's
    (DCP reshards it), its optimizer settings unpickled as plain data only."""

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Resume ``checkpoint_path`` (a collective): a sharded folder through ``checkpoints.load_into_sharded``,
        a single file (a tp=1 run's) as Lightning distributes it."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_dir():
            return super().load_checkpoint(path, weights_only=weights_only)
        from mha_lightning.checkpoints import load_into_sharded

        return load_into_sharded(path, self.model, self.optimizers)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` (a collective: every rank calls it) to a staging folder, then publish it."""
        if storage_options is not None:  # Lightning's TypeError
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        # Rank 0 names both (one collective): every rank writes into the same staging folder.
        target, staging = map(Path, self.broadcast((str(filepath), str(sibling_path(filepath, "tmp")))))
        step = int(checkpoint.get("global_step", 0))
        failure: BaseException | None = None
        try:
            super().save_checkpoint(checkpoint, staging)
        except BaseException as e:  # collected, so that no rank is left waiting in the agreement below
            failure = e
        written = self.reduce_boolean_decision(failure is None, all=True)
        message = None
        if self.global_rank == 0:
            try:
                if not written:
                    raise failure if failure is not None else OSError("another rank could not write its shard")
                publish(staging, target, step)
            except BaseException as e:  # DCP's CheckpointException is a BaseException
                cause = _os_error(e) or space_error(staging if staging.is_dir() else target.parent)
                remove(staging)
                message = str(_write_error(target, cause)) if cause is not None else _failure_line(target, e)
        message = self.broadcast(message)
        if isinstance(failure, (KeyboardInterrupt, SystemExit)):
            raise failure  # Ctrl-C stays Ctrl-C
        if message is not None:
            error = CheckpointError(message)
            error.every_rank = True  # the ranks agreed on it: rank 0 alone prints it
            raise error from failure


# How much space_error tries to write: more than a full disk's last free blocks, little for a disk with room.
PROBE_BYTES = 1 << 20


def space_error(folder: Path) -> OSError | None:
    """The OSError a write into ``folder`` gives now (None when PROBE_BYTES fit), for a save that failed without
    one: torch's zip writer reports a full disk's short write as "unexpected pos", its errno lost, and DCP passes
    on only that. Run before the failed save's files are removed, so the disk is as full as the save left it."""
    probe = folder / f".space-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        return e
    block = b"\0" * (64 << 10)
    try:
        for _ in range(PROBE_BYTES // len(block)):
            if os.write(fd, block) < len(block):
                os.write(fd, block)  # a short write: the next one raises the reason
        os.fsync(fd)
    except OSError as e:
        return e
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
    return None


def _failure_line(target: Path, error: BaseException) -> str:
    """One line for a failed save without an OSError: each failed rank's exception, not DCP's traceback text."""
    failures = getattr(error, "failures", None)
    if failures:
        text = "; ".join(f"rank {r}: {type(x).__name__}: {first_line(x)}" for r, (x, _) in sorted(failures.items()))
    else:
        text = f"{type(error).__name__}: {first_line(error)}"
    return f"cannot write checkpoint {target} ({text[:300]})"
