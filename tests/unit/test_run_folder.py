"""The run folder's lock (real processes, this machine and a record of another host), what a folder holds, the
folders a refused start removes, the held console, and the probe that names a full disk."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from helpers.folders import small_filesystem
from mha_lightning import run_folder, run_log
from mha_lightning.checkpoint_io import space_error
from mha_lightning.errors import UserError
from mha_lightning.run_folder import LOCK_FILE, Holder, RunLock, check_start, clear_run, earlier_run


def write_lock(folder: Path, holder: Holder, age: float = 0.0) -> Path:
    path = folder / LOCK_FILE
    path.write_text(json.dumps(asdict(holder)))
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


def test_the_lock_names_its_holder_and_goes_with_release(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    try:
        saved = json.loads((tmp_path / LOCK_FILE).read_text())
        assert (saved["host"], saved["pid"]) == (socket.gethostname(), os.getpid())
        assert saved["process_start"] is not None and saved["boot_id"]
        assert [p.name for p in tmp_path.iterdir()] == [LOCK_FILE]  # its temporary twin is gone
        with pytest.raises(UserError) as refused:
            RunLock(tmp_path).acquire()
        message = str(refused.value)
        assert f"is in use by another job: pid {os.getpid()} on {socket.gethostname()}" in message
        assert "\n" not in message and "another host" not in message
        with pytest.raises(UserError):
            RunLock(tmp_path).check()  # the read-only check says the same, writing nothing
    finally:
        lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    RunLock(tmp_path).check()


def test_a_lock_of_a_process_gone_from_this_machine_is_taken_over(tmp_path, caplog):
    stale = replace(Holder.this_process(), pid=dead_pid(), process_start=None)
    write_lock(tmp_path, stale)
    RunLock(tmp_path).check()  # stale: no refusal
    lock = RunLock(tmp_path)
    with caplog.at_level(logging.WARNING), lock:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"took over the lock of pid {stale.pid} on {socket.gethostname()}" in caplog.text
    assert "its process is gone" in caplog.text


def test_a_reused_pid_or_a_zombie_does_not_hold_the_lock():
    me = Holder.this_process()
    assert me.alive()
    assert not replace(me, process_start=me.process_start + 1).alive()  # the pid now names another process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while run_folder._process_start(child.pid) is not None and not run_folder._is_zombie(child.pid):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not replace(me, pid=child.pid, process_start=None).alive()  # exited, not yet reaped
    child.wait()


def test_a_lock_of_another_host_holds_until_its_heartbeat_is_old(tmp_path):
    other = replace(Holder.this_process(), host="node-17", pid=1, boot_id="other-boot")
    assert not other.on_this_machine()
    write_lock(tmp_path, other, age=run_folder.STALE_AFTER_SECONDS - 60)
    with pytest.raises(UserError) as refused:
        RunLock(tmp_path).acquire()
    assert "pid 1 on node-17" in str(refused.value) and "a lock of another host counts as abandoned 10 minutes" in str(
        refused.value
    )
    write_lock(tmp_path, other, age=run_folder.STALE_AFTER_SECONDS + 60)
    lock = RunLock(tmp_path)
    with lock:
        assert lock.took_over.startswith("pid 1 on node-17") and "no heartbeat for 11 minutes" in lock.took_over


def test_the_heartbeat_renews_the_lock_and_stops_when_another_start_took_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(run_folder, "HEARTBEAT_SECONDS", 0.05)
    lock = RunLock(tmp_path)
    with lock:
        path = tmp_path / LOCK_FILE
        old = time.time() - 3600
        os.utime(path, (old, old))
        deadline = time.monotonic() + 10
        while path.stat().st_mtime < time.time() - 60:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.02)
        intruder = replace(Holder.this_process(), pid=12345678)
        with caplog.at_level(logging.ERROR):
            write_lock(tmp_path, intruder)
            while lock._thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.02)
        assert "is no longer this run's" in caplog.text
    assert json.loads(path.read_text())["pid"] == 12345678, "release removed a lock that was not its own"


RACER = textwrap.dedent(
    """
    import sys, time
    from mha_lightning.errors import UserError
    from mha_lightning.run_folder import RunLock
    start = float(sys.argv[2])
    while time.time() < start:
        pass
    lock = RunLock(sys.argv[1])
    try:
        lock.acquire()
    except UserError as e:
        print("refused", e)
    else:
        print("won")
        time.sleep(3)
        lock.release()
    """
)


def test_of_processes_started_together_one_takes_the_lock(tmp_path):
    start = time.time() + 3
    procs = [
        subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(start)], stdout=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    outs = {p.pid: p.communicate(timeout=60)[0].strip() for p in procs}
    winners = [pid for pid, out in outs.items() if out == "won"]
    assert len(winners) == 1, outs
    for pid, out in outs.items():
        if pid != winners[0]:
            assert out.startswith("refused") and f"pid {winners[0]} on" in out, out
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_start_may_not_replace_a_run_unless_it_resumes_or_overwrites(tmp_path):
    assert earlier_run(tmp_path) is None and check_start(tmp_path, resuming=False, overwrite=False) is None
    (tmp_path / ".hydra").mkdir()
    assert earlier_run(tmp_path).startswith("an unfinished run (.hydra; no checkpoint)")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(UserError) as refused:
        check_start(tmp_path, resuming=False, overwrite=False)
    assert str(refused.value) == (
        f"run folder {tmp_path} holds a finished run (metrics.json, checkpoints last.ckpt); resume=auto continues it, "
        "overwrite=true replaces it, or choose another hydra.run.dir"
    )
    assert check_start(tmp_path, resuming=True, overwrite=False).startswith("a finished run")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "train.log").write_text("log")
    assert sorted(clear_run(tmp_path)) == [".hydra", "checkpoints", "metrics.json", "train.log"]
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and earlier_run(tmp_path) is None


def test_a_refused_start_removes_only_the_empty_folders_hydra_created(tmp_path):
    run = tmp_path / "a" / "b" / "run"
    run_folder.note_new_folders(run)
    run.mkdir(parents=True)
    (tmp_path / "a" / "keep.txt").write_text("")
    run_folder.remove_new_folders(run)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["keep.txt"]
    existing = tmp_path / "existing"
    existing.mkdir()
    run_folder.note_new_folders(existing)
    run_folder.remove_new_folders(existing)
    assert existing.is_dir(), "a folder that existed before is the user's"


def test_the_held_console_prints_nothing_before_release_and_the_file_gets_everything(tmp_path, capsys):
    root = logging.getLogger()
    console = run_log.HeldConsole(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    before = root.handlers[:]
    root.addHandler(console)
    try:
        logging.getLogger("held").warning("checked")
        assert capsys.readouterr().out == ""
        run_log.attach_file(tmp_path / "job.log")
        run_log.release_console()
        logging.getLogger("held").warning("training")
        assert capsys.readouterr().out == "checked\ntraining\n"
        assert (tmp_path / "job.log").read_text() == "checked\ntraining\n"
        refused = run_log.HeldConsole(sys.stdout)
        refused.emit(logging.makeLogRecord({"msg": "dropped"}))
        refused.drop_held()
        refused.close()
        assert capsys.readouterr().out == ""
    finally:
        for handler in root.handlers[:]:
            if handler not in before:
                root.removeHandler(handler)
                handler.close()


def test_the_space_probe_names_a_full_disk(tmp_path):
    assert space_error(tmp_path) is None
    with small_filesystem(tmp_path / "disk", "256k") as disk:
        with pytest.raises(OSError):
            (disk / "filler").write_bytes(b"\0" * (1 << 20))
        error = space_error(disk)
        assert error is not None and error.strerror == "No space left on device"
        assert sorted(p.name for p in disk.iterdir()) == ["filler"], "the probe left its file"
