"""Errors that reach the user as one line (the CLI prints ``str(err)`` and exits nonzero)."""


class FederationError(Exception):
    """Base class for every error the federation reports to the user."""


class ConfigError(FederationError):
    """A configuration value is missing, of the wrong type, or impossible."""


class DataError(FederationError):
    """Data could not be found, read or partitioned as asked."""


class UploadRejected(FederationError):
    """A client upload failed validation at the server boundary."""
