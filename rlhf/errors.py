"""Error types the library raises for bad input. The CLI turns them into one-line messages."""


class RLHFError(Exception):
    """Base class for every error raised on purpose by this package."""


class DataError(RLHFError, ValueError):
    """A data file or record is malformed (the message names the file and line)."""


class ConfigError(RLHFError, ValueError):
    """A configuration file or override is invalid (the message names the field)."""


class ModelNotFoundError(RLHFError, FileNotFoundError):
    """A model directory does not exist or holds no model."""
