"""Errors megalith raises for bad input: one line that names the problem and the fix."""


class ConfigError(ValueError):
    """An invalid configuration, detected before any process group or file is touched."""
