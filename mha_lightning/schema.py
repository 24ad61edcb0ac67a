"""What every typed config schema shares: built from a config node, checked with one-line errors.

The ground floor of the config schemas (``config.py``, ``distributed/layout.py``): no torch import.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from mha_lightning.errors import ConfigError


def from_mapping(cls, values: Mapping[str, Any] | None, group: str):
    """``cls(**values)``, but an unknown key is one line naming the group and the known keys."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{group} has no option {unknown[0]!r}; its options are {sorted(known)}")
    return cls(**values)


def positive_int(key: str, value: Any) -> None:
    """A ConfigError naming ``key`` unless ``value`` is an int >= 1 (bools are not ints here)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
