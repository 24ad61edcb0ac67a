"""A run folder belongs to one job at a time, and a start never replaces what it holds (docs/design.md, "Run folders").

- :class:`RunLock`: ``<run dir>/.run.lock``, taken by the job's launching process once every check has passed
  (the first byte the job writes), held until the job ends, all ranks and nodes included. It names its holder
  (host, pid, the process's start time); a lock whose holder is on this machine and gone is stale, and one of
  another host is stale once its heartbeat (the file's mtime, renewed every :data:`HEARTBEAT_SECONDS`) is older
  than :data:`STALE_AFTER_SECONDS`. The next start takes a stale lock over.
- :func:`check_start`: a plain start (no ``resume=auto``) in a folder that holds a run, finished or not, is refused
  unless ``overwrite=true``; :func:`clear_run` then removes that run's outputs (nothing else).
- :class:`NewFolderCallback`: Hydra creates the run folder before the task runs; a refused command removes the
  folders it created (:func:`remove_new_folders`), so a refusal leaves no trace.

No torch or Lightning here: Hydra imports this module (its callback) before every job.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from mha_lightning.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"
# The holder renews the lock's mtime this often; a lock of another host whose mtime is older than
# STALE_AFTER_SECONDS counts as abandoned (its host died, or the job hangs without its heartbeat thread).
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 600.0
# A start taking over a stale lock holds ".run.lock.break" for milliseconds; older, its start died doing so.
BREAK_STALE_SECONDS = 60.0
# What mha-train writes into a run folder: overwrite=true removes these, and nothing else (a sweep job's
# job_config.yaml stays: the process that relaunches the job wrote it for the run that replaces the old one).
RUN_OUTPUTS = (
    ".hydra",
    ".ranks",
    "checkpoints",
    "csv",
    "wandb",
    "plots",
    "metrics.json",
    "attention_entropy.csv",
    "tokenizer.json",
    "job_state.json",
)
# Signs that a folder holds a run (metrics.json: a finished one).
RUN_MARKERS = ("checkpoints", ".hydra", "attention_entropy.csv", "csv", "wandb")
FINISHED_MARKER = "metrics.json"


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot, /proc/<pid>/stat), None where /proc cannot tell."""
    stat = _read_text(f"/proc/{pid}/stat")
    fields = stat.rpartition(")")[2].split()  # the name, in parentheses, may hold spaces
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def _is_zombie(pid: int) -> bool:
    fields = _read_text(f"/proc/{pid}/stat").rpartition(")")[2].split()
    return bool(fields) and fields[0] in ("Z", "X")


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: enough to tell, on its own machine, whether that process still runs."""

    host: str
    pid: int
    started: float  # wall time the lock was taken
    token: str  # unique to one acquisition
    boot_id: str = ""  # with the host and the pid namespace: "this machine" (a container is not its host)
    pid_namespace: str = ""
    process_start: int | None = None  # tells a reused pid from the holder
    command: str = ""

    @classmethod
    def this_process(cls) -> Holder:
        """A holder record for the calling process."""
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=time.time(),
            token=uuid.uuid4().hex,
            boot_id=_read_text("/proc/sys/kernel/random/boot_id"),
            pid_namespace=_pid_namespace(),
            process_start=_process_start(os.getpid()),
            command=" ".join(sys.argv)[:500],
        )

    @classmethod
    def from_json(cls, text: str) -> Holder | None:
        """The holder a lock file names; None for a file that is not a lock of ours."""
        try:
            data = json.loads(text)
            return cls(**{k: data[k] for k in data if k in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError):
            return None

    def on_this_machine(self) -> bool:
        """Whether this process can see the holder's process (same host, boot and pid namespace)."""
        return (self.host, self.boot_id, self.pid_namespace) == (
            socket.gethostname(),
            _read_text("/proc/sys/kernel/random/boot_id"),
            _pid_namespace(),
        )

    def alive(self) -> bool:
        """On this machine: whether the holder's process still runs (not a zombie, not a reused pid)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's process: it exists
        if _is_zombie(self.pid):
            return False
        now = _process_start(self.pid)
        return self.process_start is None or now is None or now == self.process_start

    def __str__(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host} (started {started})"


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # e.g. a read-only file system answers EROFS even for a file that is not there


def _write_refused(folder: Path, error: OSError) -> UserError:
    reason = error.strerror or str(error) or type(error).__name__
    return UserError(f"cannot write to run folder {folder} ({reason}); make it writable or pick another hydra.run.dir")


class RunLock:
    """The lock of one run folder (module docstring). ``check`` reads only; ``acquire`` writes the lock file."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.holder: Holder | None = None  # this process, while it holds the lock
        self.took_over: str | None = None  # the stale holder it replaced, for the log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> tuple[Holder | None, float] | None:
        """(the holder, or None for an unreadable file; seconds since its last heartbeat); None without a lock."""
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError:
            return None, 0.0
        return Holder.from_json(text), age

    def check(self) -> None:
        """Refuse at once (one line naming the holder) when a live job holds the folder; writes nothing."""
        found = self.read()
        if found is not None and stale_reason(*found) is None:
            raise self._in_use(*found)

    def acquire(self) -> None:
        """Take the lock (a stale one too), or raise a one-line ``UserError`` naming its live holder."""
        for _ in range(20):
            try:
                self._create()
                break
            except FileExistsError:
                pass
            found = self.read()
            if found is None:
                continue  # released in between: try again
            reason = stale_reason(*found)
            if reason is None:
                raise self._in_use(*found)
            self._break(found, reason)
        else:
            raise UserError(f"could not take the lock {self.path}: other starts keep taking it; try again")
        if self.took_over:
            log.warning("run folder %s: took over the lock of %s", self.folder, self.took_over)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.holder is not None and self._holds():
            try:
                self.path.unlink()
            except OSError as e:
                log.warning("could not remove the lock %s (%s)", self.path, e)
        self.holder = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ------------------------------------------------------------------ internals
    def _holds(self) -> bool:
        found = self.read()
        return found is not None and found[0] is not None and found[0].token == self.holder.token

    def _create(self) -> None:
        """Create the lock whole or not at all: written beside it, then hard-linked to its name (atomic, also on
        NFS); an exclusive create where the filesystem has no hard links."""
        holder = Holder.this_process()
        text = json.dumps(asdict(holder), indent=1)
        tmp = self.folder / f"{LOCK_FILE}.{holder.token}"
        try:
            with open(tmp, "x") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            _remove(tmp)
            raise _write_refused(self.folder, e) from None
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            raise
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK):
                raise _write_refused(self.folder, e) from None
            self._create_exclusive(text)
        finally:
            _remove(tmp)
        self.holder = holder

    def _create_exclusive(self, text: str) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise
        except OSError as e:
            raise _write_refused(self.folder, e) from None
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def _break(self, found: tuple[Holder | None, float], reason: str) -> None:
        """Remove a stale lock, unless another start is doing so or the lock changed since it was judged."""
        breaker = self.folder / f"{LOCK_FILE}.break"
        try:
            os.close(os.open(breaker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            try:
                if time.time() - breaker.stat().st_mtime > BREAK_STALE_SECONDS:
                    breaker.unlink(missing_ok=True)  # left by a start that died taking over
            except FileNotFoundError:
                pass
            time.sleep(0.1)
            return
        except OSError as e:
            raise _write_refused(self.folder, e) from None
        try:
            now = self.read()
            if now is not None and now[0] == found[0]:
                self.path.unlink(missing_ok=True)
                self.took_over = f"{found[0] or 'an unreadable lock'}: {reason}"
        finally:
            _remove(breaker)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                if not self._holds():
                    log.error(
                        "run folder %s: the lock %s is no longer this run's (taken over by another start?); "
                        "stop one of the two jobs",
                        self.folder,
                        self.path,
                    )
                    return
                os.utime(self.path)
            except OSError:
                pass  # a passing file-system error: the next beat tries again

    def _in_use(self, holder: Holder | None, age: float) -> UserError:
        if holder is None:
            return UserError(
                f"run folder {self.folder} is locked by {self.path}, which cannot be read; if no job uses the "
                "folder, delete that file"
            )
        rule = ""
        if not holder.on_this_machine():
            rule = (
                f"; a lock of another host counts as abandoned {STALE_AFTER_SECONDS / 60:.0f} minutes after its "
                f"last heartbeat, or delete {self.path} once that job is gone"
            )
        return UserError(
            f"run folder {self.folder} is in use by another job: {holder}, last heartbeat {age:.0f} s ago; "
            f"wait for it to end or choose another hydra.run.dir{rule}"
        )


def stale_reason(holder: Holder | None, age: float) -> str | None:
    """Why a lock no longer holds (None while it does): its holder on this machine is gone, or the heartbeat of a
    holder on another host stopped more than :data:`STALE_AFTER_SECONDS` ago."""
    if holder is None:
        return "its file cannot be read" if age > 5.0 else None  # younger: a lock being written (exclusive create)
    if holder.on_this_machine():
        return None if holder.alive() else "its process is gone"
    if age > STALE_AFTER_SECONDS:
        return f"no heartbeat for {age / 60:.0f} minutes"
    return None


# --------------------------------------------------------------------------- what a folder holds
def earlier_run(folder: str | Path) -> str | None:
    """What ``folder`` holds of an earlier run, in words ("a finished run (metrics.json, last.ckpt)"); None if none."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    ckpt_dir = folder / "checkpoints"
    checkpoints = sorted(p.name for p in ckpt_dir.iterdir() if p.name.endswith(".ckpt")) if ckpt_dir.is_dir() else []
    shown = checkpoints if len(checkpoints) <= 3 else [*checkpoints[:2], f"{len(checkpoints) - 2} more"]
    ckpts = f"checkpoints {', '.join(shown)}" if checkpoints else "no checkpoint"
    if (folder / FINISHED_MARKER).is_file():
        return f"a finished run ({FINISHED_MARKER}, {ckpts})"
    found = [name for name in RUN_MARKERS if (folder / name).exists()]
    return f"an unfinished run ({', '.join(found)}; {ckpts})" if found else None


def check_start(folder: str | Path, *, resuming: bool, overwrite: bool) -> str | None:
    """Refuse a plain start in a folder that holds a run (finished or not) in one line; -> what it holds, if any.

    ``resuming``: ``resume=auto`` or a ``ckpt_path`` inside this folder; ``overwrite``: ``overwrite=true``."""
    held = earlier_run(folder)
    if held is not None and not resuming and not overwrite:
        raise UserError(
            f"run folder {folder} holds {held}; resume=auto continues it, overwrite=true replaces it, "
            "or choose another hydra.run.dir"
        )
    return held


def clear_run(folder: str | Path, job_name: str = "train") -> list[str]:
    """Remove an earlier run's outputs (:data:`RUN_OUTPUTS` and its log files) for ``overwrite=true``; other files
    stay. -> the names removed."""
    folder = Path(folder)
    logs = [p.name for p in folder.glob(f"{job_name}*.log")] + [p.name for p in folder.glob("*_ddp_process_*.log")]
    removed = []
    for name in [*RUN_OUTPUTS, *sorted(set(logs))]:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


# --------------------------------------------------------------------------- folders Hydra created
# Run folder -> its deepest ancestor that existed before Hydra created the rest: what a refused start removes.
_NEW_FOLDERS: dict[Path, Path] = {}


def note_new_folders(run_dir: str | Path) -> None:
    """Remember which of ``run_dir`` and its parents do not exist yet (Hydra is about to create them)."""
    path = Path(os.path.abspath(run_dir))
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    _NEW_FOLDERS[path] = existing


def remove_new_folders(run_dir: str | Path) -> None:
    """Remove the folders :func:`note_new_folders` saw created, innermost first, while they are empty."""
    path = Path(os.path.abspath(run_dir))
    top = _NEW_FOLDERS.pop(path, None)
    while top is not None and path != top and path.is_relative_to(top):
        try:
            path.rmdir()
        except OSError:
            return
        path = path.parent


class NewFolderCallback(Callback):
    """Hydra callback (``conf/hydra/default.yaml``): notes the run folder's missing parts before Hydra creates them."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        """A single run: its folder (``hydra.run.dir``; the same ``${now:}`` value the job gets, resolved once)."""
        try:
            note_new_folders(str(config.hydra.run.dir))
        except Exception:  # noqa: BLE001 - a folder that cannot be resolved here is Hydra's to report
            pass
