"""`mha-train` as a real subprocess: `--cfg job` prints the composed config; an invalid value
stops the CLI early with one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from helpers.runs import cli_env

CLI_CASES = {
    "cfg_job": ["--cfg", "job", "model.head_dim=16", "seed=3"],
    "d_model": ["model.d_model=0", "logger=none"],
    "num_heads": ["model.num_heads=0", "logger=none"],
    "task": ["data.task=nope", "logger=none"],
    "option": ["model=huge", "logger=none"],
    "interpolation": ["seed=${oops}", "logger=none"],
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Run every CLI case at once (they are independent): {case: (returncode, stdout, stderr, folder)}."""
    procs = {}
    for case, args in CLI_CASES.items():
        folder = tmp_path_factory.mktemp(f"cli_{case}")
        procs[case] = (
            folder,
            subprocess.Popen(
                [sys.executable, "-m", "mha_lightning.train", *args],
                cwd=folder,
                env=cli_env(folder),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    results = {}
    for case, (folder, proc) in procs.items():
        out, err = proc.communicate(timeout=120)
        results[case] = proc.returncode, out, err, folder
    return results


def test_cli_cfg_job_prints_the_composed_config(cli_runs):
    rc, out, err, folder = cli_runs["cfg_job"]
    assert rc == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["model"]["head_dim"] == 16 and cfg["model"]["d_model"] == 64
    assert cfg["seed"] == 3 and cfg["data"]["task"] == "reverse"
    assert cfg["model"]["vocab_size"] == "${data.vocab_size}"  # printed unresolved, as composed
    assert "hydra" not in cfg
    assert not (folder / "logs").exists()  # nothing ran


# Hydra wraps an exception raised by a `_target_` in InstantiationException; mha_lightning.train.instantiate
# unwraps a UserError cause, so the user gets one `error:` line and exit code 2, not "Error in call
# to target ..." with a HYDRA_FULL_ERROR hint and exit code 1.
@pytest.mark.parametrize(
    "case, key",
    [
        ("d_model", "model.d_model"),
        ("num_heads", "model.num_heads"),
        ("task", "data.task"),
        ("option", "model=huge is not an option of 'model'; choose one of: base, large, small, tiny"),
        ("interpolation", "Interpolation key 'oops' not found"),
    ],
)
def test_cli_invalid_value_fails_early_with_one_clear_line(cli_runs, case, key):
    rc, out, err, folder = cli_runs[case]
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and key in errors[0], err
    assert rc == 2, err
    assert not list(folder.rglob("*.ckpt")) and not list(folder.rglob("offline-run-*"))
