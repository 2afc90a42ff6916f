"""Errors that reach users: each carries a message that says what is wrong and how to fix it."""


class NitroError(Exception):
    """Base class for errors shown to users as one line (CLI) or a clear HTTP error (server)."""


class ModelLoadError(NitroError):
    """A model folder, component or UNet file that cannot be loaded."""


class InvalidRequest(NitroError):
    """A generation parameter outside what the model accepts; `field` names the parameter."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ExportVerificationError(NitroError):
    """An exported graph disagrees with torch past the tolerance: the export is not used (export/verify.py)."""
