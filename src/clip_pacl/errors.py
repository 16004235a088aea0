"""Exceptions for people: the CLI prints them as one `error: ...` line and exits 2."""


class ClipPaclError(Exception):
    """Base class: a user-facing error whose message is one clear sentence."""


class ConfigError(ClipPaclError):
    """A model or run configuration is invalid or unknown."""


class CheckpointError(ClipPaclError):
    """A file or directory is not a checkpoint we can read, or does not match the model."""


class DataError(ClipPaclError):
    """Input data is missing, malformed, or has the wrong columns."""


class MissingDependencyError(ClipPaclError):
    """An optional extra is needed for this feature."""

    def __init__(self, package: str, extra: str, feature: str):
        super().__init__(f"{feature} needs '{package}': pip install 'clip-pacl[{extra}]'")
