"""Tensor-parallel (tp=2) runs through the real CLI: two gloo processes per run.

Lightning's launcher re-runs sys.argv to start the second process, so these runs are
subprocesses (`python -m mha_lightning.train ...`), never `train(cfg)` inside pytest."""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers.config import QUIET, compose_train_config, text_overrides
from helpers.corpus import write_corpus
from helpers.perf import batches_of, perf_rows, saved_config
from helpers.runs import cli_env, csv_train_rows, start_mha_train
from helpers.wandb_offline import find_run_files, read_history, read_run_info
from mha_lightning import evaluate
from mha_lightning.checkpoint_folder import MANIFEST, verify
from mha_lightning.checkpoints import META_FILE, consolidate_main, load_model, read_info
from mha_lightning.train import METRICS_FILE, train

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
TP2 = ["trainer.devices=2", "parallel.tensor_parallel_size=2"]
SMALL = ["data.num_val=100", "data.num_test=100"]
# Validate (and so checkpoint) every 5 steps; every training step in the CSV log.
LOGGED = ["trainer.log_every_n_steps=1", "trainer.val_check_interval=5"]
STEPS = 20
MiB = 1 << 20
# Dropout inside the sharded attention and FFN: the resume must bring back every rank's streams.
DROPOUT = ["model.dropout=0.1", "model.attention_dropout=0.1"]


def mha_train(
    run_dir: Path, *overrides: str, timeout: int = 300, file_size_limit: int | None = None, threads_set: bool = True
) -> subprocess.CompletedProcess:
    """`python -m mha_lightning.train ...` into ``run_dir``. With ``file_size_limit`` every process
    of the run (workers inherit it) gets EFBIG when a write would make a file larger: a disk that
    fills up in the middle of a shard. ``threads_set=False``: without the suite's OMP_NUM_THREADS=1,
    as a user runs it."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.RLIM_INFINITY))

    cmd = [sys.executable, "-m", "mha_lightning.train", *QUIET, *overrides, f"hydra.run.dir={run_dir}"]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        cmd,
        cwd=run_dir.parent,
        env={k: v for k, v in cli_env(run_dir.parent).items() if threads_set or k != "OMP_NUM_THREADS"},
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit if file_size_limit else None,
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def launch_torchrun(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """scripts/launch_torchrun.sh: 1 node x 2 processes started by torchrun, not by Lightning."""
    env = {**cli_env(run_dir.parent), "RUN_DIR": str(run_dir), "NNODES": "1", "NPROC": "2", "TP": "2"}
    cmd = ["bash", str(SCRIPTS / "launch_torchrun.sh"), *QUIET, *overrides]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=300)


def preempted_tp2(run_dir: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, int]:
    """Start a tp=2 run, SIGTERM it once its first checkpoint is complete -> (its result, the step saved)."""
    proc = start_mha_train(run_dir, *QUIET, *overrides)
    sealed = run_dir / "checkpoints" / "last.ckpt" / MANIFEST
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not sealed.exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert result.returncode == 143, f"exit {result.returncode}\n{err[-5000:]}"
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert line.startswith("error: stopped by SIGTERM at step ") and str(sealed.parent) in line, line
    return result, int(line.split("at step ")[1].split(";")[0])


@pytest.fixture(scope="module")
def tp2_runs(tmp_path_factory):
    """A: 20 steps at tp=2 with dropout, uninterrupted, greedy, CSV + W&B, launched by scripts/launch_torchrun.sh.
    B: the same with resume=auto, launched by Lightning itself (`python -m mha_lightning.train
    trainer.devices=2 ...`): SIGTERM once its first checkpoint (step 5) is complete, then the same
    command again, with beam search, finishes it. C: B resumed once more with the disk full."""
    root = tmp_path_factory.mktemp("tp2")
    a, b = root / "A", root / "B"
    runs = {"A": ok(launch_torchrun(a, *SMALL, *LOGGED, *DROPOUT, "logger=[csv,wandb]", f"trainer.max_steps={STEPS}"))}
    common = [*TP2, *SMALL, *LOGGED, *DROPOUT, "logger=csv", "resume=auto", f"trainer.max_steps={STEPS}"]
    assert common[-1].startswith("trainer.max_steps=")
    runs["B1"], runs["stopped_at"] = preempted_tp2(b, *common, "test=false")
    runs["B2"] = ok(mha_train(b, *common, "module.decoding.strategy=beam"))
    # C: B's last checkpoint, then a full disk: resumed to step 25, where no rank can write its shard.
    runs["C"] = mha_train(b, *common[:-1], "trainer.max_steps=25", "test=false", file_size_limit=MiB)
    return a, b, runs


def test_tp2_trains_validates_tests_and_saves_sharded(tp2_runs):
    a, _, runs = tp2_runs
    out = runs["A"].stdout
    assert "rank 0: mesh (dp=1, tp=2) at (dp_rank=0, tp_rank=0); holds 2/4 heads [0-1] of every attention layer" in out
    assert "rank 1: mesh (dp=1, tp=2) at (dp_rank=0, tp_rank=1); holds 2/4 heads [2-3] of every attention layer" in out

    metrics = json.loads((a / METRICS_FILE).read_text())
    for key in ("val/loss", "val/exact_match", "test/loss", "test/exact_match", "test/acc"):
        assert math.isfinite(metrics[key]), key
    losses = csv_train_rows(a)
    assert sorted(losses) == list(range(STEPS))
    assert losses[STEPS - 1][0] < losses[0][0]
    # perf/* at every step: each batch's tokens once (not once per tensor-parallel rank), both ranks' memory.
    perf, batches = perf_rows(a), batches_of(saved_config(a), STEPS)
    assert sorted(perf) == list(range(STEPS))
    for step, (tokens, _) in enumerate(batches):
        logged = perf[step]
        assert logged["perf/tokens_per_s"] * logged["perf/step_ms"] / 1e3 == pytest.approx(tokens, rel=1e-6), step
        assert logged["perf/tokens_per_s_per_device"] == pytest.approx(logged["perf/tokens_per_s"] / 2)
        assert logged["perf/peak_memory_mib"] > 100 and "perf/mfu" not in logged  # no known peak on a CPU

    # The resolved config Hydra saved is the tp=2 one.
    saved = yaml.safe_load((a / ".hydra" / "config.yaml").read_text())
    assert saved["parallel"]["tensor_parallel_size"] == 2 and saved["trainer"]["devices"] == 2

    # Only global rank 0 talks to W&B: one offline run, every step once, the tp=2 config.
    (run_file,) = find_run_files(a / "wandb")
    history = [r for r in read_history(run_file) if "train/loss" in r]
    assert [r["trainer/global_step"] for r in history] == list(range(STEPS))
    assert [r["train/loss"] for r in history] == [losses[s][0] for s in range(STEPS)]
    assert read_run_info(run_file)["config"]["run_config"]["parallel"]["tensor_parallel_size"] == 2

    last = a / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / ".metadata").is_file(), "expected a sharded (DCP) checkpoint folder"
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert torch.load(last / META_FILE, weights_only=True)["global_step"] == STEPS
    assert verify(last) == STEPS  # sealed by its manifest; nothing left in staging
    assert not [p.name for p in last.parent.iterdir() if p.name.startswith(".")]
    # Loaded whole into a single-device model: every q projection has all 4 heads' rows again.
    model, _ = load_model(last)
    assert tuple(model.encoder_layers[0].self_attn.q.weight.shape) == (64, 64)


def test_tp2_sigterm_then_resume_auto_matches_uninterrupted(tp2_runs):
    """SIGTERM at tp=2 saves the step reached on both ranks; resume=auto continues it exactly.
    Also: torchrun (A) and Lightning's own launcher (B) give the same numbers."""
    a, b, runs = tp2_runs
    stopped = runs["stopped_at"]
    assert 5 < stopped < STEPS, f"stopped at {stopped}: the signal came before the first checkpoint or after the end"
    full, resumed = csv_train_rows(a), csv_train_rows(b, version=1)
    assert f"resuming {b / 'checkpoints' / 'last.ckpt'} (step {stopped})" in runs["B2"].stdout + runs["B2"].stderr
    assert sorted(resumed) == list(range(stopped, STEPS)), f"the resumed run must continue at step {stopped}"
    for step in range(stopped, STEPS):
        assert resumed[step] == full[step], f"step {step}: resumed {resumed[step]} != uninterrupted {full[step]}"


def test_tp2_beam_search_validates_and_tests(tp2_runs):
    _, b, runs = tp2_runs
    metrics = json.loads((b / METRICS_FILE).read_text())
    assert math.isfinite(metrics["test/exact_match"]) and math.isfinite(metrics["val/exact_match"])
    assert "test/exact_match" in runs["B2"].stdout
    last = b / "checkpoints" / "last.ckpt"
    assert read_info(last).decoding["strategy"] == "beam"
    assert torch.load(last / META_FILE, weights_only=True)["global_step"] == STEPS


def test_full_disk_during_a_sharded_save_is_one_line_and_keeps_the_previous_checkpoint(tp2_runs):
    _, b, runs = tp2_runs
    failed = runs["C"]
    assert failed.returncode == 2, failed.stderr[-5000:]
    assert "Traceback" not in failed.stderr, failed.stderr[-5000:]
    (line,) = [x for x in failed.stderr.splitlines() if x.startswith("error:")]
    assert "cannot write checkpoint" in line and "File too large" in line, line
    last = b / "checkpoints" / "last.ckpt"
    assert max(p.stat().st_size for p in last.iterdir()) > MiB  # the shards outgrow the limit
    assert verify(last) == STEPS, "the previous checkpoint must stay whole"
    assert not [p.name for p in last.parent.iterdir() if p.name.startswith(".")], "a staging folder was left"


def test_consolidated_checkpoint_evaluates_like_the_sharded_one(tp2_runs, tmp_path, capsys):
    a, _, _ = tp2_runs
    sharded = a / "checkpoints" / "last.ckpt"
    single = tmp_path / "consolidated.ckpt"
    assert consolidate_main([str(sharded), str(single)]) == 0
    assert single.is_file()
    state = torch.load(single, map_location="cpu", weights_only=False)["state_dict"]
    assert all(type(t) is torch.Tensor for t in state.values())  # no DTensors left

    capsys.readouterr()
    results = {}
    for name, path in (("single", single), ("sharded", sharded)):
        out = tmp_path / f"{name}.hyp.txt"
        assert evaluate.main([str(path), "--split", "test", "--output", str(out)]) == 0
        results[name] = json.loads(capsys.readouterr().out)
        results[name].pop("hypotheses")
    assert results["single"] == results["sharded"]
    assert results["single"]["n"] == 100
    assert (tmp_path / "single.hyp.txt").read_text() == (tmp_path / "sharded.hyp.txt").read_text()
    # The same weights scored at tp=2 during training (greedy): same exact-match.
    assert results["single"]["test/exact_match"] == json.loads((a / METRICS_FILE).read_text())["test/exact_match"]


def test_consolidate_keeps_an_existing_output_unless_forced(tp2_runs, tmp_path, capsys):
    sharded, single = tp2_runs[0] / "checkpoints" / "last.ckpt", tmp_path / "model.ckpt"
    single.write_bytes(b"someone's file")
    capsys.readouterr()
    assert consolidate_main([str(sharded), str(single)]) == 2
    assert capsys.readouterr().err == f"error: {single} exists; choose another output, or pass --force to replace it\n"
    assert single.read_bytes() == b"someone's file"
    assert consolidate_main([str(sharded), str(single), "--force"]) == 0
    assert load_model(single)[1].global_step == STEPS


def test_analysis_sharded_over_two_ranks_equals_the_single_device_one(tp2_runs, tmp_path):
    # mha-analyze on A's tp=2 checkpoint folder: once on one process, once sharded itself (tp=2).
    last = tp2_runs[0] / "checkpoints" / "last.ckpt"
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}"
        cmd = [sys.executable, "-m", "mha_lightning.analysis.cli", f"ckpt={last}", f"trainer.devices={devices}"]
        cmd += ["examples=32", "batch_size=16", "maps.examples=1", f"hydra.run.dir={out}"]
        cmd += ["prune.points=2", "prune.random_orders=0", "prune.examples=8"]
        ok(subprocess.run(cmd, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300))
        results[devices] = json.loads((out / "results.json").read_text())
    one, two = results[1], results[2]
    assert two["tensor_parallel_size"] == 2 and one["statistics"]["examples"] == two["statistics"]["examples"] == 32
    for stat in ("importance", "importance_norm", "entropy", "entropy_norm", "confidence", "js", "alignment"):
        assert set(one["statistics"][stat]) == set(two["statistics"][stat]), stat
        for kind, values in one["statistics"][stat].items():
            sharded = torch.tensor(two["statistics"][stat][kind], dtype=torch.float64)
            torch.testing.assert_close(sharded, torch.tensor(values, dtype=torch.float64), rtol=0, atol=1e-5)
    # Role evidence from the gathered heads: the same shares (argmax counts; a near-tie may fall the other
    # way at fp32 rounding, so a few of the ~300 queries may count differently), the same roles.
    for kind, shares in one["statistics"]["roles_share"].items():
        for name, values in shares.items():
            sharded = torch.tensor(two["statistics"]["roles_share"][kind][name], dtype=torch.float64)
            torch.testing.assert_close(
                sharded, torch.tensor(values, dtype=torch.float64), rtol=0, atol=1e-9, equal_nan=True
            )
    assert two["roles"] == one["roles"]
    # Heads removed on a sharded model (each rank gates its own heads): the same orders and curves, and
    # the same token losses with each head removed alone (the vocabulary-parallel logits gathered).
    assert two["pruning"]["orders"] == one["pruning"]["orders"]
    assert two["pruning"]["curves"] == one["pruning"]["curves"]
    assert two["single_heads"]["heads"] == one["single_heads"]["heads"]
    assert two["single_heads"]["loss_rise"] == pytest.approx(one["single_heads"]["loss_rise"], abs=1e-5)


def test_sharded_checkpoint_resumes_on_one_device(tp2_runs, tmp_path):
    """ckpt_path= a tp=2 folder, on one device: it continues at the saved step (tests/cli/test_resharding.py
    checks every layout change against an uninterrupted run)."""
    _, b, _ = tp2_runs
    folder = b / "checkpoints" / "last.ckpt"
    run = tmp_path / "tp1"
    proc = ok(mha_train(run, *SMALL, *LOGGED, "logger=csv", f"ckpt_path={folder}", f"trainer.max_steps={STEPS + 2}"))
    said = "written at (dp=1, tp=2), at (dp=1, tp=1): weights and optimizer state are resharded"
    assert said in proc.stdout + proc.stderr
    assert sorted(csv_train_rows(run)) == [STEPS, STEPS + 1]
    assert (run / "checkpoints" / "last.ckpt").is_file()  # one device writes single files again


def test_single_device_checkpoint_initialises_tp2_run(tmp_path):
    """init_from a tp=1 checkpoint: the tp=2 model, before any training step, scores exactly
    what the tp=1 model scored on the test split (a model ignoring init_from would not)."""
    single = tmp_path / "single"
    reference = train(
        compose_train_config(
            single, [*QUIET, *SMALL, "logger=none", "trainer.max_steps=10", "trainer.val_check_interval=10"]
        )
    )
    run = tmp_path / "tp2"
    proc = ok(
        mha_train(
            run,
            *TP2,
            *SMALL,
            "logger=none",
            f"init_from={single / 'checkpoints' / 'last.ckpt'}",
            "+trainer.limit_train_batches=0",
            threads_set=False,
        )
    )
    assert "holds 2/4 heads [2-3]" in proc.stdout
    # Started as a user starts it (no OMP_NUM_THREADS): the two ranks split this machine's cores.
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"2 processes on this node, {share} CPU thread(s) each" in proc.stdout + proc.stderr
    sharded = json.loads((run / METRICS_FILE).read_text())
    for key in ("test/loss", "test/acc", "test/exact_match"):
        torch.testing.assert_close(torch.tensor(sharded[key]), torch.tensor(reference[key]), msg=key)


def _leftover_processes(marker: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def test_bad_parallel_config_fails_before_spawning(tmp_path):
    """One CLI case; every layout check is in tests/unit/test_schemas.py (preflight, in-process).
    Pointed at an existing run, the rejected command leaves that run's record untouched."""
    overrides, needles = ["model.num_heads=3", *TP2], ["model.num_heads (3)", "tensor_parallel_size (2)"]
    run = tmp_path / "bad_parallel_run"
    record = run / ".hydra" / "config.yaml"
    record.parent.mkdir(parents=True)
    record.write_text("the config of an earlier run\n")
    proc = mha_train(run, *overrides, "logger=none", timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Initializing distributed" not in proc.stdout + proc.stderr
    assert not _leftover_processes(str(run)), _leftover_processes(str(run))
    assert record.read_text() == "the config of an earlier run\n"
    assert sorted(p.name for p in record.parent.iterdir()) == ["config.yaml"]


def test_missing_text_file_fails_before_spawning(tmp_path):
    files = write_corpus(tmp_path / "corpus")
    files["src"] = tmp_path / "corpus" / "no_such_file.de"
    run = tmp_path / "bad_text_run"
    proc = mha_train(run, *TP2, *text_overrides(files), "logger=none", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(files["src"]) in errors[0], proc.stderr[-3000:]
    assert "Initializing distributed" not in proc.stdout + proc.stderr
    assert not _leftover_processes(str(run))


@pytest.mark.slow
def test_sweep_runs_each_two_process_job_once(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "mha_lightning.train",
        "-m",
        *QUIET,
        *TP2,
        "trainer.max_steps=4,6",
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=2",
        "test=false",
        "data.num_val=50",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=560)
    ok(proc)
    assert (proc.stdout + proc.stderr).count("Launching 2 jobs locally") == 1
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job, steps in (("0", 4), ("1", 6)):
        d = sweep / job
        assert yaml.safe_load((d / "job_config.yaml").read_text())["trainer"]["max_steps"] == steps
        metrics = json.loads((d / METRICS_FILE).read_text())
        assert math.isfinite(metrics["val/loss"])
        # Ran exactly once (a second run would add csv/version_1), for exactly its own steps.
        assert [p.name for p in (d / "csv").iterdir()] == ["version_0"]
        assert sorted(csv_train_rows(d)) == list(range(steps))
        assert "holds 2/4 heads [2-3]" in proc.stdout
    assert not _leftover_processes(str(sweep))
