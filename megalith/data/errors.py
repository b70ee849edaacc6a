"""The error for bad data files and inputs: one line naming the file, the problem and the fix."""

from megalith.errors import ConfigError


class DataError(ConfigError):
    """A data file or input that cannot be used (missing, corrupt, wrong format)."""
