"""The command line checked before Hydra runs it: an unknown config option or key is one line.

Hydra reports ``model=huge`` or ``modle.d_model=3`` in a dozen lines (the search path, a hint
about ``HYDRA_FULL_ERROR``) and exits 1. :func:`check_command_line` composes the same config
first, with Hydra's compose API, and turns the failure into one line naming the group and its
choices, or the key (docs/design.md, "Configuration"). Commands with flags (``--cfg``,
``--config-dir``, ``--help``...) are left to Hydra: they may change where options come from.
"""

from __future__ import annotations

from importlib.resources import files

from mha_lightning.errors import first_line

CONFIG_MODULE = "mha_lightning.conf"


def group_options(group: str) -> list[str] | None:
    """The options of one of the package's config groups (None when ``group`` is not one)."""
    folder = files(CONFIG_MODULE).joinpath(group)
    if "/" in group or not folder.is_dir():
        return None
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _unknown_option(group: str, name: str, options: list[str]) -> str:
    return f"{group}={name} is not an option of '{group}'; choose one of: {', '.join(options)}"


def _composition_problem(error: Exception) -> str:
    """One line for a failed ``compose``."""
    from hydra.errors import MissingConfigException

    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, name = str(error.missing_cfg_file).rpartition("/")
        options = list(error.options or group_options(group) or [])
        return _unknown_option(group, name, options) if options else f"no config {error.missing_cfg_file}"
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    cause = error.__cause__
    reason = f" ({first_line(cause).rstrip('.')})" if cause is not None else ""
    hint = f"; {lines[1][0].lower()}{lines[1][1:]}" if len(lines) > 1 else ""
    return f"{lines[0].rstrip('.') if lines else type(error).__name__}{reason}{hint}"


def check_command_line(args: list[str], config_name: str = "train") -> str | None:
    """None when Hydra may run ``args`` as they are; else the one-line problem.

    A sweep (``-m``) is checked with its first value of each swept key, and every value of a
    swept config group against the group's options."""
    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    multirun, overrides = False, []
    for arg in args:
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg.startswith("-"):
            return None
        else:
            overrides.append(arg)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        return f"cannot parse the overrides: {first_line(e).rstrip('.')}"
    first_values = []
    for override in parsed:
        if not override.is_sweep_override():
            first_values.append(override.input_line)
            continue
        try:
            values = list(override.sweep_string_iterator())
        except Exception:  # noqa: BLE001 - interval(...), tag(...): a search space, not a list of values
            continue
        options = group_options(override.key_or_group)
        for value in values if options is not None else []:
            if value not in options:
                return _unknown_option(override.key_or_group, value, options)
        if values and multirun:
            first_values.append(f"{override.get_key_element()}={values[0]}")
        elif values:
            return f"{override.input_line} is a sweep; run it with -m (--multirun)"
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            compose(config_name, overrides=first_values)
    except Exception as e:  # noqa: BLE001 - any failure Hydra would print as a wall of text
        return _composition_problem(e)
    return None
