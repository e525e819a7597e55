"""Errors that reach the user as one line naming the config field and what is allowed."""


class ConfigError(ValueError):
    """A config value (or input it points to) is invalid; the message names the field."""
