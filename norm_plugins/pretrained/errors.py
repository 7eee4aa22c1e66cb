"""Errors raised while resolving, verifying, converting or matching pretrained backbones.

Each is a subclass of the built-in exception a caller would already catch for that kind of
problem, so ``except FileNotFoundError`` around a checkpoint load keeps working.
"""


class PretrainedError(Exception):
    """Base class of every norm_plugins pretrained-backbone error."""


class UnknownPretrainedError(PretrainedError, KeyError):
    """A ``norm_plugins://NAME`` names no manifest entry."""

    def __str__(self) -> str:
        # KeyError would repr() the message and print it inside quotes.
        return str(self.args[0]) if self.args else ''


class ManifestError(PretrainedError, ValueError):
    """A manifest file does not follow the schema (missing field, null without a reason, ...)."""


class PretrainedFileMissingError(PretrainedError, FileNotFoundError):
    """The converted checkpoint of a manifest entry is not in the cache folder."""


class ChecksumMismatchError(PretrainedError, ValueError):
    """A file's sha256 differs from the one recorded in the manifest."""


class ConversionError(PretrainedError, ValueError):
    """A source checkpoint does not map exactly onto the target backbone."""


class IncompatibleBackboneError(PretrainedError, ValueError):
    """A config's backbone cannot hold the weights of the manifest entry it loads."""
