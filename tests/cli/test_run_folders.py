"""One run per folder, refusals before any write: every refused command leaves the folder's checksum listing as it
was, prints its one line alone and exits 2; two starts on one folder never mix; a killed holder's lock is taken
over by the next start (docs/design.md, "Run folders")."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers.config import compose_train_config, text_overrides
from helpers.corpus import write_corpus
from helpers.folders import listing, read_only, small_filesystem
from helpers.runs import cli_env, csv_train_rows
from helpers.wandb_offline import find_run_files, read_run_info
from mha_lightning.errors import UserError
from mha_lightning.run_folder import LOCK_FILE
from mha_lightning.train import train

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
# The finished run the refusals are pointed at: text data, every writer on (CSV, W&B, the entropy record).
RUN = [*QUIET, "logger=[csv,wandb]", "monitor.every_n_steps=5", "monitor.render_plots=false", "test=false"]
STEPS = ["trainer.max_steps=10", "trainer.val_check_interval=5"]


def command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def train_command(run: Path, *overrides: str) -> list[str]:
    return command("mha_lightning.train", *overrides, f"hydra.run.dir={run}")


def start(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env or cli_env(cwd),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def assert_refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 and one line on stderr, nothing else printed (no INFO line before it, no traceback)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr}"
    assert lines[0].startswith("error: ") and proc.stdout == "", proc.stdout[-2000:] + proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A finished text run (10 steps, tokenizer, CSV, W&B, entropy record), started as a user starts it, and the
    bad inputs the refusals point at."""
    root = tmp_path_factory.mktemp("folders")
    files = write_corpus(root / "corpus")
    data = text_overrides(files)
    run = root / "run"
    ok(finished(start(train_command(run, *RUN, *data, *STEPS), root)))
    bad = root / "bad"
    bad.mkdir()
    lines = files["src"].read_text(encoding="utf-8").splitlines()
    (bad / "long.en").write_text(files["tgt"].read_text(encoding="utf-8") + "one line too many\n", encoding="utf-8")
    (bad / "tabs.tsv").write_text("ein hund\ta dog\nder\thund\tthe dog\n", encoding="utf-8")
    (bad / "latin1.de").write_bytes("".join(f"{x} grüße\n" for x in lines).encode("latin-1"))
    (bad / "empty.tsv").write_text("")
    nul = [*lines[:2], lines[2].replace(" ", " \0", 1), *lines[3:]]
    (bad / "nul.de").write_text("".join(x + "\n" for x in nul), encoding="utf-8")
    words = " ".join(["der hund sieht ein haus"] * 200_000)  # 5 MB on one line: no pair survives the filter
    (bad / "one_line.tsv").write_text(f"{words}\t{words}\n", encoding="utf-8")
    (bad / "tokenizer.json").write_text('{"model": "not a tokenizer"')
    return {"root": root, "run": run, "data": data, "bad": bad, "files": files}


BASE = [*RUN, *STEPS, "resume=auto"]
# case -> (overrides on top of the finished run's, what the line says); "{bad}" is the folder of bad inputs.
DATA_TIME = {
    "data.batch_size=0": (["data.batch_size=0"], ["data.batch_size must be a positive integer (or null), got 0"]),
    "data.max_len=-1": (["data.max_len=-1"], ["data.max_len must be an integer", "got -1"]),
    "seed=-1": (["seed=-1"], ["seed must be an integer from 0 to 4294967295, got -1"]),
    "+foo=1": (["+foo=1"], ["foo is not a setting of mha-train", "+trainer.profiler=simple"]),
    "+trainer.foo=1": (["+trainer.foo=1"], ["trainer.foo", "has no option 'foo'"]),
    "missing file": (["data.train.src={bad}/missing.de"], ["data file not found", "missing.de"]),
    "line counts": (["data.train.tgt={bad}/long.en"], ["different line counts", "201"]),
    "tsv tabs": (["data.val.tsv={bad}/tabs.tsv"], ["tabs.tsv: line 2 has 2 tab(s)"]),
    "not utf-8": (["data.train.src={bad}/latin1.de"], ["latin1.de: line 1 is not valid UTF-8"]),
    "empty file": (["data.val.tsv={bad}/empty.tsv"], ["empty.tsv", "the file is empty"]),
    "nul byte": (["data.train.src={bad}/nul.de"], ["nul.de: line 3 holds a NUL byte"]),
    "all filtered": (
        ["data.train.src=null", "data.train.tgt=null", "data.train.tsv={bad}/one_line.tsv"],
        ["the length filter dropped all 1 training pair(s)", "one_line.tsv", "data.max_len=100"],
    ),
    "garbage tokenizer": (["data.tokenizer_path={bad}/tokenizer.json"], ["cannot load tokenizer file"]),
    "plain start": (["resume=null"], ["holds a finished run", "resume=auto continues it", "overwrite=true replaces"]),
    "overwrite and resume": (["overwrite=true"], ["set either resume=auto", "or overwrite=true"]),
}


@pytest.mark.parametrize("case", sorted(DATA_TIME))
def test_a_refused_start_changes_nothing(text_run, case):
    """train(cfg) in this process (the CLI's one line and exit code: the test after this one)."""
    args, needles = DATA_TIME[case]
    run = text_run["run"]
    cfg = compose_train_config(run, [*BASE, *text_run["data"], *(a.format(bad=text_run["bad"]) for a in args)])
    before = listing(run)
    with pytest.raises(UserError) as refused:
        train(cfg)
    message = str(refused.value)
    assert "\n" not in message and all(n in message for n in needles), message
    assert listing(run) == before


@pytest.mark.parametrize("online", ["no key", "no network"])
def test_online_wandb_without_key_or_network_is_refused_at_once(text_run, online, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    for proxy in PROXIES:
        monkeypatch.delenv(proxy, raising=False)
    if online == "no key":
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
        needles = ["WANDB_MODE=online needs a W&B API key", "run `wandb login`", "WANDB_MODE=offline"]
    else:
        monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
        needles = [
            "WANDB_MODE=online: http://127.0.0.1:",
            "cannot be reached (Connection refused)",
            "WANDB_MODE=offline",
        ]
    run = text_run["run"]
    before, started = listing(run), time.monotonic()
    with pytest.raises(UserError) as refused:
        train(compose_train_config(run, [*BASE, *text_run["data"]]))
    assert all(n in str(refused.value) for n in needles), str(refused.value)
    assert time.monotonic() - started < 20  # wandb itself: a traceback after 8 s (no key), 98 s (no network)
    assert listing(run) == before


PROXIES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def test_the_cli_prints_the_one_line_alone_and_changes_nothing(text_run):
    """mha-train, mha-eval and mha-analyze as a user runs them, started together (a refusal writes nothing, so
    none sees another's writes): exit 2, one line on stderr, nothing on stdout, the folder as it was."""
    run, bad, cwd = text_run["run"], text_run["bad"], text_run["root"] / "cwd"
    ckpt = str(run / "checkpoints" / "last.ckpt")
    cases = {
        "plain start": (train_command(run, *BASE[:-1], *text_run["data"]), ["holds a finished run"]),
        "seed=-1": (train_command(run, *BASE, *text_run["data"], "seed=-1"), ["seed must be an integer"]),
        "nul byte": (
            train_command(run, *BASE, *text_run["data"], f"data.train.src={bad / 'nul.de'}"),
            ["nul.de: line 3 holds a NUL byte"],
        ),
        "mha-eval --input <folder>": (
            command("mha_lightning.evaluate", ckpt, "--input", str(bad)),
            [f"input file {bad} is a directory"],
        ),
        "mha-analyze split=train": (
            command("mha_lightning.analysis.cli", f"ckpt={ckpt}", "split=train"),
            ["split='train' must be val or test"],
        ),
    }
    before = listing(run)
    procs = {case: (start(cmd, cwd), needles) for case, (cmd, needles) in cases.items()}
    for proc, needles in procs.values():
        assert_refused(finished(proc), *needles)
    assert listing(run) == before
    assert not (cwd / "logs").exists(), "a refused mha-analyze left its output folder"


def test_a_refused_start_creates_no_folder(tmp_path):
    procs = [
        start(train_command(tmp_path / "new" / "a" / "run", "data.batch_size=0"), tmp_path),
        start(
            command("mha_lightning.train", "seed=-1"), tmp_path / "cwd"
        ),  # the default folder, logs/train/runs/<time>
    ]
    lines = [assert_refused(finished(p)) for p in procs]
    assert "data.batch_size" in lines[0] and "seed" in lines[1]
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in (tmp_path / "cwd").iterdir()) == []


def test_a_read_only_run_folder_is_one_line_for_resume_and_for_mha_eval(text_run):
    run = text_run["run"]
    before = listing(run)
    with read_only(run):
        resumed = finished(start(train_command(run, *RUN, *text_run["data"], *STEPS, "resume=auto"), run.parent))
        evaluated = finished(
            start(command("mha_lightning.evaluate", str(run / "checkpoints" / "last.ckpt")), run.parent)
        )
    denied = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    assert_refused(resumed, f"cannot write to run folder {run}", denied)
    assert_refused(evaluated, "cannot write the hypotheses to", "test.hyp.txt", denied, "--output")
    assert listing(run) == before


def test_overwrite_replaces_the_run_and_keeps_other_files(text_run, tmp_path):
    """overwrite=true: the earlier run's outputs go, the user's own file stays; `+trainer.profiler=simple` (a `+` key
    inside a component) reaches Lightning's Trainer."""
    run = tmp_path / "run"
    shutil.copytree(text_run["run"], run)
    (run / "notes.txt").write_text("mine\n")
    old = sorted(p.name for p in (run / "checkpoints").iterdir())
    done = ok(
        finished(
            start(
                train_command(
                    run, *RUN, *text_run["data"], "trainer.max_steps=4", "overwrite=true", "+trainer.profiler=simple"
                ),
                tmp_path,
            )
        )
    )
    assert "FIT Profiler Report" in done.stdout + done.stderr
    assert "overwrite=true: removed the earlier run" in (run / "train.log").read_text()
    assert (run / "notes.txt").read_text() == "mine\n"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert "step000010.ckpt" in old and not (run / "checkpoints" / "step000010.ckpt").exists()
    assert [p.name for p in (run / "csv").iterdir()] == ["version_0"] and len(find_run_files(run / "wandb")) == 1
    assert json.loads((run / "metrics.json").read_text())["val/loss"] is not None


# ------------------------------------------------------------------------------ the lock
LOCKED = [*QUIET, "monitor.enabled=false", "logger=[csv,wandb]", "trainer.log_every_n_steps=1", "test=false"]
LONG = [*LOCKED, "trainer.val_check_interval=10", "data.num_val=16", "trainer.max_steps=100000"]


def process_tree(root: int) -> list[int]:
    """``root`` and every process it started, and they started (from /proc: parents, not sessions)."""
    parents = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parents[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += [child for child, parent in parents.items() if parent == pid]
    return tree


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def holder_pid(line: str) -> int:
    return int(line.split("in use by another job: pid ")[1].split()[0])


@pytest.mark.slow
def test_two_starts_on_one_folder_never_mix_and_a_killed_holder_is_taken_over(tmp_path):
    """Two `resume=auto` starts at once (one with seed=1): one runs, the other is refused naming it. A third start
    while the holder is stopped (SIGSTOP) changes nothing; once the holder is killed (-9) the next start takes
    the lock over and resumes its checkpoint, in the same W&B run."""
    run = tmp_path / "run"
    a = start(train_command(run, *LONG, "resume=auto"), tmp_path)
    b = start(train_command(run, *LONG, "resume=auto", "seed=1"), tmp_path)
    deadline = time.monotonic() + 240
    while a.poll() is None and b.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    loser, winner = (a, b) if a.poll() is not None else (b, a)
    line = assert_refused(finished(loser), f"run folder {run} is in use by another job", socket.gethostname())
    assert holder_pid(line) == winner.pid
    seed = 1 if winner is b else 0

    last = run / "checkpoints" / "last.ckpt"
    while winner.poll() is None and not last.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    holder = process_tree(winner.pid)  # W&B's service, in a session of its own, writes the run file too
    signal_all(holder, signal.SIGSTOP)  # the folder holds still: a refused start must not change it
    try:
        before = listing(run)
        refused = finished(start(train_command(run, *LONG), tmp_path))
        assert holder_pid(assert_refused(refused, "in use by another job")) == winner.pid
        assert listing(run) == before
    finally:
        signal_all(holder, signal.SIGKILL)
        winner.communicate(timeout=60)
    assert (run / LOCK_FILE).is_file(), "a killed holder leaves its lock"
    checkpoint = torch.load(last, weights_only=True)
    saved, wandb_id = checkpoint["global_step"], checkpoint["wandb_run_id"]
    assert f"seed: {seed}\n" in (run / ".hydra" / "config.yaml").read_text()

    resumed = ok(
        finished(
            start(
                train_command(
                    run,
                    *LOCKED,
                    f"seed={seed}",
                    "resume=auto",
                    f"trainer.max_steps={saved + 5}",
                    "trainer.val_check_interval=10",
                    "data.num_val=16",
                ),
                tmp_path,
            )
        )
    )
    log = (run / "train.log").read_text()
    assert f"took over the lock of pid {winner.pid} on {socket.gethostname()}" in log and "its process is gone" in log
    assert f"resuming {last} (step {saved})" in log, log[-2000:]
    assert sorted(csv_train_rows(run, version=1)) == list(range(saved, saved + 5))
    assert read_run_info(find_run_files(run / "wandb")[-1])["id"] == wandb_id  # the killed run's, continued
    assert not (run / LOCK_FILE).exists(), "the lock outlived its run"
    assert "resume=auto: resuming" in resumed.stdout


# ------------------------------------------------------------------------------ a full disk under a sharded save
@pytest.mark.slow
def test_full_disk_during_a_sharded_save_names_the_folder_and_no_space_left(tmp_path):
    """A real full disk (a 2 MB tmpfs): torch's zip writer may report it as "unexpected pos" without the errno;
    the line still says the folder and "No space left on device" (checkpoint_io.space_error)."""
    with small_filesystem(tmp_path / "disk", "2m") as disk:
        run = disk / "run"
        cmd = train_command(run, *QUIET, "monitor.enabled=false", "logger=none", "trainer.devices=2")
        cmd += ["parallel.tensor_parallel_size=2", "trainer.max_steps=6", "trainer.val_check_interval=3", "test=false"]
        done = finished(start(cmd + ["data.num_val=20"], tmp_path))
        errors = [x for x in done.stderr.splitlines() if x.startswith("error:")]
        assert done.returncode == 2 and len(errors) == 1, done.stderr[-5000:]
        assert "Traceback" not in done.stderr, done.stderr[-5000:]
        assert f"cannot write checkpoint {run / 'checkpoints'}/" in errors[0], errors[0]
        assert "No space left on device" in errors[0], errors[0]
        assert not (run / LOCK_FILE).exists()
