"""preflight against the processes an external launcher started: torchrun's LOCAL_WORLD_SIZE and WORLD_SIZE.

The variables are set here exactly as torchrun sets them in each worker; the two-node run itself is
tests/cli/test_two_node.py."""

from __future__ import annotations

import pytest

from mha_lightning.config import preflight
from mha_lightning.errors import ConfigError, report

TWO_NODES = ["trainer.num_nodes=2", "trainer.devices=2", "parallel.tensor_parallel_size=2"]


def torchrun_env(monkeypatch, nnodes: int, nproc_per_node: int, rank: int = 0) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(nproc_per_node))
    monkeypatch.setenv("WORLD_SIZE", str(nnodes * nproc_per_node))
    monkeypatch.setenv("RANK", str(rank))


def test_a_matching_two_node_layout_passes(make_cfg, monkeypatch):
    torchrun_env(monkeypatch, nnodes=2, nproc_per_node=2)
    plan = preflight(make_cfg(*TWO_NODES))
    assert (plan.data_parallel_size, plan.tensor_parallel_size) == (2, 2)


@pytest.mark.parametrize(
    "overrides, needles",
    [
        # The silent case: each of the 4 processes would train a whole single-device job into one folder.
        (["trainer.devices=1"], ["trainer.devices (1)", "--nproc-per-node 2", "trainer.devices=2"]),
        # Forgot trainer.num_nodes: dp x tp = 2 passes the layout check, the launcher started 4.
        (
            ["trainer.devices=2", "parallel.tensor_parallel_size=2"],
            ["trainer.num_nodes (1)", "= 2", "world size (4 processes)", "(2 with 2 processes each)"],
        ),
    ],
    ids=["devices_not_nproc_per_node", "num_nodes_missing"],
)
def test_a_layout_that_does_not_match_torchrun_is_one_line(make_cfg, monkeypatch, capsys, overrides, needles):
    torchrun_env(monkeypatch, nnodes=2, nproc_per_node=2)
    with pytest.raises(ConfigError) as info:
        preflight(make_cfg(*overrides))
    message = str(info.value)
    assert all(needle in message for needle in needles), message
    # Every rank finds the same mistake: rank 0 prints it once, the others stay quiet, all exit 2.
    assert report(info.value, 0) == 2 and report(info.value, 3) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: trainer.devices"), line


def test_without_a_launcher_nothing_is_checked(make_cfg, monkeypatch):
    for var in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert preflight(make_cfg(*TWO_NODES)).world_size == 4
