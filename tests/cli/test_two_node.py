"""A two-node job simulated on one machine: two torchrun agents, tp=2 inside each "node", dp=2 across.

Each agent is `scripts/launch_torchrun.sh` with NNODES=2 (torchrun --nnodes 2 --nproc-per-node 2,
c10d rendezvous on localhost), as a user runs it on each node. An agent's workers inherit its
stdout, so the mesh line each rank prints (`rank 2: mesh (dp=2, tp=2) at (dp_rank=1, tp_rank=0)`)
lands in the output of the agent, i.e. the node, that started it: that is how the test tells which
ranks share a node. The job is compared with a one-process run of the same config on the same
global batches (docs/design.md, "What changes when tp=2")."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers.config import QUIET, compose_train_config, text_overrides
from helpers.corpus import write_corpus
from helpers.distributed import free_port
from helpers.runs import cli_env, csv_train_rows
from mha_lightning.checkpoint_folder import verify
from mha_lightning.train import train

LAUNCHER = Path(__file__).resolve().parents[2] / "scripts" / "launch_torchrun.sh"
STEPS = 5
PER_RANK_BATCH = 16  # dp=2: global batch 32, as the one-process run's
# A short, fast run whose loss moves: no warmup, no validation, the loss of every step in the CSV log.
COMMON = [
    *QUIET,
    "logger=csv",
    "test=false",
    "trainer.log_every_n_steps=1",
    "+trainer.limit_val_batches=0",
    f"trainer.max_steps={STEPS}",
    "module.scheduler.warmup_steps=1",
    "module.optimizer.lr=3e-3",
]
MESH_LINE = re.compile(r"^rank (\d+): mesh \(dp=(\d+), tp=(\d+)\) at \(dp_rank=(\d+), tp_rank=(\d+)\)", re.M)
AGENT_TIMEOUT = 300  # seconds for the whole job: a bound (1-2.5 minutes on the busy shared 2-core machine)


def start_agent(run_dir: Path, env: dict[str, str], node: int, overrides: list[str]) -> subprocess.Popen:
    """One "node": the launcher script in a session of its own, its output in files (never a full pipe)."""
    out = (run_dir.parent / f"node{node}.out").open("w")
    err = (run_dir.parent / f"node{node}.err").open("w")
    with out, err:
        return subprocess.Popen(
            ["bash", str(LAUNCHER), *overrides],
            cwd=run_dir.parent,
            env=env,
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,
        )


def processes_of(run_dir: Path) -> list[int]:
    """Pids of the job's processes still alive: every one names the run directory on its command line."""
    marker, found = str(run_dir).encode(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def stop(agents: list[subprocess.Popen], run_dir: Path) -> None:
    """End both agents and every worker, whatever state they are in. torchrun starts each worker in a
    session of its own, so killing an agent's session would leave its workers behind: SIGTERM the agents
    first (torchrun then ends its workers), then SIGKILL what is left, agents' sessions and workers by pid."""
    for agent in agents:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(a.poll() is None for a in agents):
        time.sleep(0.2)
    for agent in agents:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
    for pid in processes_of(run_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_two_nodes(run_dir: Path, overrides: list[str]) -> tuple[list[tuple[int, str, str]], list[int]]:
    """Both agents, started together as on two machines -> ([(exit code, stdout, stderr)] per node,
    pids of the job's processes still alive once both agents had ended)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **cli_env(run_dir.parent),
        "NNODES": "2",
        "NPROC": "2",
        "TP": "2",
        "MASTER_ADDR": "localhost",
        "MASTER_PORT": str(free_port()),
        "RDZV_ID": run_dir.parent.name,
        "RUN_DIR": str(run_dir),
    }
    agents: list[subprocess.Popen] = []
    left: list[int] = []
    try:
        agents = [start_agent(run_dir, env, node, overrides) for node in (0, 1)]
        deadline = time.monotonic() + AGENT_TIMEOUT
        while time.monotonic() < deadline and any(a.poll() is None for a in agents):
            time.sleep(0.2)
            if any(a.poll() not in (None, 0) for a in agents):
                break  # one node failed: the other would wait for it until the collective timeout
        if all(a.poll() is not None for a in agents):
            left = processes_of(run_dir)
    finally:
        codes = [a.poll() for a in agents]
        stop(agents, run_dir)
    logs = run_dir.parent
    nodes = [
        (code, (logs / f"node{node}.out").read_text(), (logs / f"node{node}.err").read_text())
        for node, code in enumerate(codes)
    ]
    return nodes, left


@pytest.fixture(scope="module")
def two_node_job(tmp_path_factory):
    """The two-node job (text data: its tokenizer is trained in the shared run directory) and a
    one-process run of the same config with twice the per-rank batch, reading that tokenizer."""
    root = tmp_path_factory.mktemp("two_node")
    files = write_corpus(root / "corpus")
    data = text_overrides(files)
    run_dir = root / "job" / "run"
    nodes, left = run_two_nodes(run_dir, [*COMMON, *data, f"data.batch_size={PER_RANK_BATCH}"])
    for node, (code, out, err) in enumerate(nodes):
        assert code == 0, f"node {node}: exit {code}\n{out[-3000:]}\n{err[-5000:]}"
    assert not left, f"processes {left} outlived both agents"
    reference = root / "one_process"
    train(
        compose_train_config(
            reference,
            [
                *COMMON,
                *data,
                f"data.batch_size={2 * PER_RANK_BATCH}",
                f"data.tokenizer_path={run_dir / 'tokenizer.json'}",
                "callbacks=none",
            ],
        )
    )
    return run_dir, nodes, csv_train_rows(reference)


@pytest.mark.slow
def test_two_node_job_trains_like_one_process(two_node_job):
    run_dir, _, reference = two_node_job
    losses = csv_train_rows(run_dir)
    assert sorted(losses) == sorted(reference) == list(range(STEPS))
    for step in range(STEPS):
        loss, ref = losses[step][0], reference[step][0]
        assert loss == pytest.approx(ref, rel=1e-4), f"step {step}: two nodes {loss} vs one process {ref}"
    assert reference[STEPS - 1][0] < 0.8 * reference[0][0], "the runs must really train"


@pytest.mark.slow
def test_each_tensor_parallel_group_lies_inside_one_node(two_node_job):
    _, nodes, _ = two_node_job
    placement = []
    for node, (_, out, _) in enumerate(nodes):
        ranks = sorted((int(r), (int(dp), int(tp)), (int(d), int(t))) for r, dp, tp, d, t in MESH_LINE.findall(out))
        assert len(ranks) == 2, f"node {node} printed {len(ranks)} mesh lines:\n{out[-3000:]}"
        (first, sizes, (dp_rank, tp_rank)), (second, sizes2, (dp_rank2, tp_rank2)) = ranks
        assert sizes == sizes2 == (2, 2)
        # One node: consecutive global ranks, one data-parallel replica, both halves of its heads.
        assert second == first + 1 and first % 2 == 0, f"node {node} holds ranks {first}, {second}"
        assert dp_rank == dp_rank2 == first // 2 and (tp_rank, tp_rank2) == (0, 1), f"node {node}: {ranks}"
        placement.append(dp_rank)
    assert sorted(placement) == [0, 1], "each node must hold its own data-parallel replica"


@pytest.mark.slow
def test_the_shared_run_directory_holds_one_tokenizer_and_one_sharded_checkpoint(two_node_job):
    run_dir, nodes, _ = two_node_job
    # Trained by global rank 0 alone: once per node, both nodes would write one tokenizer.json at once.
    trained = [out.count("saved tokenizer to") for _, out, _ in nodes]
    assert sum(trained) == 1, f"tokenizer trained {trained} times per node"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert verify(last) == STEPS  # sealed by its manifest after all four ranks wrote their shards
    assert sorted(p.name for p in last.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]


@pytest.mark.parametrize(
    "missing, named",
    [("RUN_DIR", "set RUN_DIR to one folder"), ("MASTER_ADDR", "set MASTER_ADDR")],
    ids=["no_run_dir", "no_master_addr"],
)
def test_the_launcher_refuses_two_nodes_without_a_shared_setting(tmp_path, missing, named):
    """A run directory named after each node's clock would split one job over two folders; no
    MASTER_ADDR, no rendezvous. The script says so in one line before starting torchrun."""
    env = {**cli_env(tmp_path), "NNODES": "2", "NPROC": "2", "RUN_DIR": str(tmp_path / "run"), "MASTER_ADDR": "h"}
    del env[missing]
    proc = subprocess.run(["bash", str(LAUNCHER)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: NNODES=2: ") and named in line, line
