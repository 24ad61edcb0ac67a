"""The command line checked before Hydra runs it: every mistake is one line naming what to fix."""

from __future__ import annotations

import pytest

from mha_lightning.overrides import check_command_line, group_options


def test_group_options_list_the_packaged_configs():
    assert group_options("model") == ["base", "large", "small", "tiny"]
    assert "csv" in group_options("logger") and "wandb" in group_options("logger")
    assert group_options("modle") is None and group_options("hydra/launcher") is None


@pytest.mark.parametrize(
    "args, expected",
    [
        (["model=huge"], "model=huge is not an option of 'model'; choose one of: base, large, small, tiny"),
        (["+model=huge"], "model=huge is not an option of 'model'; choose one of: base, large, small, tiny"),
        (["logger=[csv,nope]"], "logger=nope is not an option of 'logger'; choose one of: csv, none, wandb"),
        (["-m", "model=tiny,huge"], "model=huge is not an option of 'model'"),
        (["model=tiny,small"], "model=tiny,small is a sweep; run it with -m (--multirun)"),
        (["modle.d_model=3"], "Could not override 'modle.d_model' (Key 'modle' is not in struct); to append"),
        (["-m", "seed=1,2", "modle.d_model=3"], "Could not override 'modle.d_model'"),
        (["seed=[1"], "cannot parse the overrides: no viable alternative at input '[1'"),
        (["+experiment=reverse_tiny"], "Multiple values for experiment"),
    ],
)
def test_mistakes_are_one_line(args, expected):
    problem = check_command_line(args)
    assert problem is not None and expected in problem, problem
    assert "\n" not in problem


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["model=small", "logger=[csv,wandb]", "trainer.max_steps=5", "hydra.run.dir=/tmp/somewhere"],
        ["-m", "model=tiny,small", "seed=range(3)", "module.optimizer.lr=interval(0.0001,0.01)"],
        ["experiment=reverse_tiny"],
        ["--cfg", "job", "model=huge"],  # flags: Hydra's own business
    ],
)
def test_good_commands_pass(args):
    assert check_command_line(args) is None
