"""The README cannot drift from the code: its commands run as shown, and its config keys exist.

Every ``mha-*`` command in a ``bash`` block (and every inline `mha-...` span) must be an entry point of
pyproject's [project.scripts] whose parser accepts the arguments shown: argparse commands are parsed by
their own parser (stopped right after parsing), Hydra commands (mha-train, mha-analyze) by Hydra's flag
parser and then composed with the package's config, as ``check_command_line`` does before a run. Every
dotted config key the README names in backticks (`monitor.every_n_steps`, `trainer.devices=2`) must exist
in, or compose with, the train config (with some config group's option chosen) or the analyze config.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from functools import cache
from importlib import import_module
from importlib.resources import files
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from mha_lightning.overrides import CONFIG_MODULE, check_command_line

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

# Hydra entry points and the config each composes; every other mha-* script is argparse-based.
HYDRA_CONFIGS = {"mha-train": "train", "mha-analyze": "analyze"}
# The launch scripts pass their extra arguments to mha-train as overrides.
LAUNCHERS = {"scripts/launch_torchrun.sh": "mha-train", "scripts/launch_slurm.sbatch": "mha-train"}
# Groups whose options add keys (data.train.src with data=text, hydra.sweeper.n_trials with an Optuna search).
# Ordered so that the keys the README names are found early: compositions are the test's cost.
GROUPS = ("hydra/launcher", "hparams_search", "data", "model", "module", "trainer", "logger", "callbacks", "monitor")
GROUPS += ("experiment", "debug")
# Spans that are meant not to compose: the README's example of an unknown key.
NOT_CONFIG = {"+foo=1"}
# Spans that are not config: a W&B run's job type, torch.load's argument.
NOT_CONFIG |= {"job_type=sweep-report", "weights_only=True"}
# A dotted name in backticks is a config key unless it names a file.
FILE_SUFFIXES = {"json", "csv", "md", "png", "yaml", "ckpt", "py", "sh", "sbatch", "db", "de", "en", "tsv", "txt"}
KEY = re.compile(r"\+?[a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)+")
OVERRIDE = re.compile(r"\+?[a-z_][a-z0-9_/]*(?:\.[a-z0-9_]+)*=\S*")
PLACEHOLDER = re.compile(r"<[^<>\n]*>")


def _unplaceholder(text: str) -> str:
    """``<time>``, ``<sharded folder>``: any one word stands in for what the user fills in."""
    return PLACEHOLDER.sub("PLACEHOLDER", text)


def scripts() -> dict[str, str]:
    """pyproject's [project.scripts]: name -> "module:function"."""
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section.group(1), re.M))


def code_blocks(text: str) -> tuple[list[str], str]:
    """The ``bash`` blocks of a Markdown text, and the text without any fenced block."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)
    return blocks, re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def inline_spans(prose: str) -> list[str]:
    """Inline code spans (a span may run over a line break, which reads as a space)."""
    return [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)]


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(command, arguments) of every mha-* command, and of every launch script's mha-train overrides."""
    blocks, prose = code_blocks(text)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    lines += [s for s in inline_spans(prose) if s.startswith("mha-") and " " in s]  # `mha-eval` alone names it
    found = []
    for line in lines:
        for part in re.split(r"&&|;|\|", _unplaceholder(line)):
            words = shlex.split(part, comments=True)
            starts = [i for i, w in enumerate(words) if w.startswith("mha-") or w in LAUNCHERS]
            if starts:
                name, args = words[starts[0]], [w for w in words[starts[0] + 1 :] if w != "..."]
                found.append((LAUNCHERS.get(name, name), args))
    return found


def config_spans(text: str) -> list[str]:
    """Inline spans that name config keys or overrides: `monitor.every_n_steps`, `trainer.devices=2 ...`."""
    spans = []
    for span in inline_spans(code_blocks(text)[1]):
        if span.startswith("mha-") or span in NOT_CONFIG:
            continue
        words = _unplaceholder(span).split()
        if all(OVERRIDE.fullmatch(w) for w in words):
            spans.append(" ".join(words))
        elif KEY.fullmatch(span) and span.rsplit(".", 1)[1] not in FILE_SUFFIXES:
            spans.append(span)
    return spans


class _Parsed(BaseException):
    """Raised right after an argparse command has parsed its arguments: nothing of it runs."""


def argparse_problem(target: str, args: list[str]) -> str | None:
    """None when the command's own parser accepts ``args``; else what argparse printed."""
    module, _, function = target.partition(":")
    main = getattr(import_module(module), function)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        original(self, argv, namespace)
        raise _Parsed

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
        mp.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        try:
            main(args)
        except _Parsed:
            return None
    return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"{target} ran without parsing"


def hydra_problem(config_name: str, args: list[str]) -> str | None:
    """Hydra's flags (``--cfg job``, ``-m``) against its own parser, then the overrides composed."""
    from hydra._internal.utils import get_args_parser  # the parser @hydra.main runs; no public name

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parsed = get_args_parser().parse_args(args)
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1]
    return check_command_line((["-m"] if parsed.multirun else []) + parsed.overrides, config_name)


def command_problem(name: str, args: list[str]) -> str | None:
    target = scripts().get(name)
    if target is None:
        return f"{name} is not in [project.scripts]"
    if name in HYDRA_CONFIGS:
        return hydra_problem(HYDRA_CONFIGS[name], args)
    return argparse_problem(target, args)


def group_options(group: str) -> list[str] | None:
    """The options of a config group of the package (``hydra/launcher`` too); None when it is not one."""
    folder = files(CONFIG_MODULE).joinpath(group)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")) if folder.is_dir() else None


@cache
def bases() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(config name, overrides): the default train config, the analyze config, one per option of each group."""
    options = [(f"{group}={option}",) for group in GROUPS for option in group_options(group)]
    return (("train", ()), ("analyze", ())) + tuple(("train", o) for o in options)


@cache
def composed(config_name: str, overrides: tuple[str, ...]) -> dict:
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    return OmegaConf.to_container(cfg, resolve=False)


def _in(config: dict, key: str) -> bool:
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def has_key(key: str) -> bool:
    """Whether some base config holds ``key`` (composed lazily: most keys are in the first)."""
    return any(_in(composed(*base), key) for base in bases())


def span_problem(span: str) -> str | None:
    """None when every word of ``span`` is a key of some base config, or an override that composes with one:
    it parses, its key exists (a group's value is one of its options). Values are not typed by Hydra."""
    for word in span.split():
        if "=" not in word:
            if not has_key(word):
                return f"`{word}` is a key of no config (train with any group option, or analyze)"
            continue
        try:
            (override,) = OverridesParser.create().parse_overrides([word])
        except HydraException as e:
            return f"`{word}` does not parse: {str(e).strip().splitlines()[0]}"
        key, value = override.key_or_group, word.split("=", 1)[1]
        options = group_options(key)
        if options is not None:
            unknown = [v for v in value.split(",") if v not in options + ["null"]]
            if unknown:
                return f"`{word}`: {unknown[0]} is not an option of {key} ({', '.join(options)})"
        elif not word.startswith("+") and not has_key(key):
            return f"`{word}`: {key} is a key of no config (train with any group option, or analyze)"
    return None


def test_readme_commands_are_entry_points_with_their_options():
    found = commands(README.read_text())
    assert len(found) >= 30, f"only {len(found)} commands found in the README: is the extraction broken?"
    assert {name for name, _ in found} >= set(scripts()), "every entry point should be shown in the README"
    problems = [f"{name} {' '.join(args)}: {p}" for name, args in found if (p := command_problem(name, args))]
    assert not problems, "\n".join(problems)


def test_readme_config_keys_compose():
    spans = config_spans(README.read_text())
    assert len(spans) >= 40, f"only {len(spans)} config keys found in the README: is the extraction broken?"
    problems = [p for span in spans if (p := span_problem(span))]
    assert not problems, "\n".join(problems)


def test_readme_links_and_scripts_exist():
    text = README.read_text()
    targets = re.findall(r"\]\(([^)#:]+)\)", text) + re.findall(r"\b(scripts/[\w.]+)", text)
    missing = sorted({t for t in targets if not (ROOT / t).exists()})
    assert not missing, missing


def test_the_checks_catch_a_drifted_readme():
    """The checks fail on what drift looks like: a renamed key, a misspelled flag, a dropped entry point."""
    sample = (
        "Set `monitor.every_n_step` and `trainer.max_stepz=3`; keep `monitor.every_n_steps`, `metrics.json`.\n"
        "```bash\nmha-eval CKPT --beem 5\nmha-train modle.d_model=3\nmha-train --cfg jobs\nmha-frobnicate x\n"
        "mha-train -m model.num_heads=2,4 data=text data.train.src=train.de\nmha-analyze ckpt=<folder> split=val\n```\n"
    )
    assert [span_problem(s) is None for s in config_spans(sample)] == [False, False, True]
    assert span_problem("model=huge") and span_problem("head_dim=16") and span_problem("seed=[1")
    assert span_problem("hydra/launcher=slurm hydra.launcher.partition=gpu data.train.src=train.de") is None
    verdicts = [command_problem(name, args) for name, args in commands(sample)]
    assert [v is None for v in verdicts] == [False, False, False, False, True, True], verdicts
    assert "--beem" in verdicts[0] and "modle" in verdicts[1] and "jobs" in verdicts[2]
    assert verdicts[3] == "mha-frobnicate is not in [project.scripts]"
