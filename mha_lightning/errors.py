"""User-facing errors: one clear line naming the value and what to do.

The console entry points catch ``UserError`` and print ``error: <message>`` without a
traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's config, data or checkpoint (not a bug in the package)."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value."""


class DataError(UserError, ValueError):
    """Unreadable or inconsistent input data."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unreadable or does not match the model."""
