"""The one exception type for mistakes a user can fix by editing a config or an override."""

from typing import Any


class ConfigError(ValueError):
    """A bad config value, a missing file or an unavailable device.

    The CLI prints its message without a traceback and exits non-zero, so the message must name
    the offending key (or file) and say what would be valid.
    """


def require(ok: bool, key: str, value: Any, valid: str) -> None:
    """Raise a ConfigError naming ``key`` unless ``ok``; ``valid`` describes accepted values."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {valid}.")
