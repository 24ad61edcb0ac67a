"""The console and log file of a Hydra job, opened only once the run is accepted (docs/design.md, "Run folders").

Hydra's default job logging opens ``<run dir>/<job>.log`` before the task runs, so a refused command appended to
a finished run's log (and a read-only run folder failed with "Unable to configure handler 'file'"), and the
checks' INFO lines came before the one error line. ``conf/hydra/job_logging/run_log.yaml`` installs
:class:`HeldConsole` instead: it holds every record back until :func:`release_console`, and keeps them for the
log file that :func:`attach_file` opens once the run owns its folder. A refusal calls :func:`drop_held`, so its
one line is all the user sees. Without that logging config (a test calling ``train(cfg)``) all three do nothing.

Light on purpose: Hydra imports it to configure logging, before the task runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

# Records kept for a log file not yet open; beyond this, the oldest go (a job that never opens one keeps no more).
BACKLOG_LIMIT = 20_000


class HeldConsole(logging.StreamHandler):
    """A console handler that holds records until released, and keeps them for the job's log file."""

    def __init__(self, stream=None) -> None:
        super().__init__(stream)
        self._held: list[logging.LogRecord] | None = []  # None once released
        self._backlog: list[logging.LogRecord] | None = []  # None once a file has them
        self.others: list[HeldHandler] = []  # a library's own console handlers, held alongside (hold_logger)

    def emit(self, record: logging.LogRecord) -> None:
        """Hold ``record`` (before :meth:`show_held`) or print it; keep it for the log file until one is attached."""
        if self._backlog is not None:
            self._backlog.append(record)
            del self._backlog[:-BACKLOG_LIMIT]
        if self._held is not None:
            self._held.append(record)
        else:
            super().emit(record)

    def show_held(self) -> None:
        """Print the held records and every later one as it comes."""
        held, self._held = self._held, None
        for record in held or []:
            super().emit(record)
        for other in self.others:
            other.show_held()

    def drop_held(self) -> None:
        """Forget the held records (a refused command: its one error line is all it prints)."""
        if self._held is not None:
            self._held = []
        if self._backlog is not None:
            self._backlog = []
        for other in self.others:
            other.drop_held()

    def take_backlog(self) -> list[logging.LogRecord]:
        """The records a log file opened now should start with; later ones go to that file directly."""
        backlog, self._backlog = self._backlog or [], None
        return backlog

    def close(self) -> None:
        """At exit, a job that was neither accepted nor refused (a bug's traceback) still shows its records."""
        self.show_held()
        super().close()


class HeldHandler(logging.Handler):
    """Stands in for another handler (Lightning's own stderr console) and holds its records like the console."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__(target.level)
        self.target = target
        self._held: list[logging.LogRecord] | None = []

    def emit(self, record: logging.LogRecord) -> None:
        """Hold ``record`` until the console shows its own, then pass it on."""
        if self._held is not None:
            self._held.append(record)
        else:
            self.target.handle(record)

    def hold(self) -> None:
        """Hold records again, until the next :meth:`show_held` or :meth:`drop_held`."""
        if self._held is None:
            self._held = []

    def show_held(self) -> None:
        """Pass the held records on, and every later one as it comes."""
        held, self._held = self._held, None
        for record in held or []:
            self.target.handle(record)

    def drop_held(self) -> None:
        """Forget the held records."""
        if self._held is not None:
            self._held = []


def _consoles() -> list[HeldConsole]:
    return [h for h in logging.getLogger().handlers if isinstance(h, HeldConsole)]


def hold_logger(name: str) -> None:
    """Hold the records of logger ``name``'s own handlers (a library that prints besides the root logger, as
    Lightning's ``lightning`` logger does on stderr) with the console's."""
    consoles = _consoles()
    if not consoles:
        return
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        if isinstance(handler, HeldHandler):
            handler.hold()  # held for an earlier job of this process (a sweep): hold again
        elif isinstance(handler, HeldConsole):
            continue
        else:
            logger.removeHandler(handler)
            handler = HeldHandler(handler)
            logger.addHandler(handler)
        consoles[0].others.append(handler)


def release_console() -> None:
    """The run is accepted: print what the checks logged, and from now on everything as it comes."""
    for console in _consoles():
        console.show_held()


def drop_held() -> None:
    """The command is refused: what its checks logged is never printed or written."""
    for console in _consoles():
        console.drop_held()


def attach_file(path: str | Path) -> None:
    """Open the job's log file (Hydra's ``<run dir>/<job name>.log``, its format) with every record so far."""
    consoles = _consoles()
    if not consoles:
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(consoles[0].formatter)
    for record in consoles[0].take_backlog():
        handler.emit(record)
    for console in consoles[1:]:
        console.take_backlog()
    logging.getLogger().addHandler(handler)
