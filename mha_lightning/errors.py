"""User-facing errors: one clear line naming the value and what to do.

Every console entry point runs under :func:`exit_on_user_error`: a ``UserError`` prints
``error: <message>`` on stderr, without a traceback, and exits with :data:`USER_ERROR_EXIT`;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

USER_ERROR_EXIT = 2  # like argparse's usage errors

F = TypeVar("F", bound=Callable[..., int])


class UserError(Exception):
    """A mistake in the user's config, data or checkpoint (not a bug in the package)."""

    # True when every rank of a multi-process run raises the same error at the same point
    # (the ranks agreed on it): only rank 0 prints it.
    every_rank = False


class ConfigError(UserError, ValueError):
    """An invalid configuration value."""


class DataError(UserError, ValueError):
    """Unreadable or inconsistent input data."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unreadable or does not match the model."""


class Preempted(UserError):
    """The run received SIGTERM and stopped after saving a checkpoint (resume it with ``ckpt_path``)."""

    exit_code = 143  # 128 + SIGTERM, as a shell reports a process ended by it
    every_rank = True


class NonFiniteError(UserError):
    """Training produced a non-finite loss or gradient norm and stopped (``module.on_nonfinite=stop``)."""

    exit_code = 3
    every_rank = True


class RankLost(UserError):
    """A collective failed: another rank hung past ``parallel.timeout_minutes`` or died."""

    exit_code = 4

    def __init__(self, message: str, workers: Any = None) -> None:
        super().__init__(message)
        self.workers = workers  # the Lightning launcher that started this process's workers, if any

    def end_workers(self) -> None:
        """SIGKILL the worker processes this process started (a hung one ignores anything milder)."""
        if self.workers is not None:
            self.workers.kill(signal.SIGKILL)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a one-line report shows."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def report(error: UserError, rank: int | None = None) -> int:
    """Print ``error`` as one line on stderr; return the exit code for it (2, or the error's own).

    ``rank``: this process's rank in a multi-process run; an error every rank raised is printed by rank 0 only."""
    if not (error.every_rank and rank):
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
    return getattr(error, "exit_code", USER_ERROR_EXIT)


def exit_on_user_error(main: F) -> F:
    """Wrap a CLI ``main(argv) -> exit code`` so a ``UserError`` becomes one line and exit code 2, and
    argparse's exit (``--help``, a usage error it has already printed) becomes its exit code."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            return report(e)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 2

    return wrapped  # type: ignore[return-value]
