"""scripts/bench_memory.py --quick end to end: one training step per technique in real gloo worlds,
its per-rank bytes and targets written to JSON and a PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_memory.py"


@pytest.mark.slow
def test_quick_mode_measures_what_each_technique_saves(tmp_path):
    out = tmp_path / "bench_memory.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {
        "tiny tp=1",
        "tiny tp=1 AC full",
        "tiny tp=2 plain TP",
        "tiny tp=2 SP+VP",
        "tiny tp=2 SP+VP AC full",
    }
    for name, r in results.items():
        for key in ("params_bytes", "grads_bytes", "optimizer_bytes", "saved_activation_bytes"):
            assert r[key] > 0, (name, key)
        assert r["grads_bytes"] == r["params_bytes"], name  # every gradient in its parameter's layout
        assert r["optimizer_bytes"] > 2 * r["params_bytes"], name  # AdamW: two moments and a step each
    one, plain, both = results["tiny tp=1"], results["tiny tp=2 plain TP"], results["tiny tp=2 SP+VP"]
    # Plain TP shards the layers only; vocabulary parallelism also the embeddings and output projection.
    assert both["params_bytes"] < plain["params_bytes"] < one["params_bytes"]
    # Sequence parallelism keeps 1/tp of the residual stream's activations.
    assert both["saved_activation_bytes"] < plain["saved_activation_bytes"] < one["saved_activation_bytes"]
    assert results["tiny tp=1 AC full"]["saved_activation_bytes"] < one["saved_activation_bytes"] / 4
    assert results["tiny tp=1 AC full"]["params_bytes"] == one["params_bytes"]
    # The same step on the same batch: every layout computes the same loss.
    for r in results.values():
        assert r["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert {t["target"].split(":")[0] for t in report["targets"]} >= {"tiny tp=2 SP+VP vs tp=1"}
    assert out.with_suffix(".png").stat().st_size > 10_000
