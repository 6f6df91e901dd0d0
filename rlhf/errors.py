"""Error types the library raises for bad input. The CLI turns them into one-line messages."""


class RLHFError(Exception):
    """Base class for every error raised on purpose by this package."""


class DataError(RLHFError, ValueError):
    """A data file or record is malformed (the message names the file and line)."""


class ConfigError(RLHFError, ValueError):
    """A configuration file or override is invalid (the message names the field)."""


class ModelNotFoundError(RLHFError, FileNotFoundError):
    """A model directory does not exist or holds no model."""


class NotFoundError(RLHFError, LookupError):
    """A named thing (task, job, model version, prompt) does not exist. Services answer NOT_FOUND."""


class PermissionDeniedError(RLHFError):
    """The caller may not touch this thing (another labeler's task, say). Services answer
    PERMISSION_DENIED (HTTP 403)."""


class ResourceExhaustedError(RLHFError):
    """A queue or limit is full; the caller should retry later. Services answer RESOURCE_EXHAUSTED."""


class ConflictError(RLHFError, ValueError):
    """A request contradicts what is stored, e.g. an idempotency key reused for other content."""


class UnavailableError(RLHFError):
    """The service cannot answer yet (e.g. no model version loaded). Services answer UNAVAILABLE."""
