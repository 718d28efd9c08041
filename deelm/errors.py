"""Exceptions deelm raises for bad models and bad input."""


class DeeLMError(Exception):
    """Base class of deelm's own errors."""


class ModelFileError(DeeLMError, ValueError):
    """A model file is missing, unreadable, corrupted or not one deelm can run.

    ``path`` is the file and ``reason`` what is wrong with it.
    """

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UnsupportedModelError(ModelFileError):
    """The file is readable but holds an architecture, tensor type or tokeniser
    deelm does not support."""


class ModelNotFoundError(DeeLMError, FileNotFoundError):
    """No model was given and the default model package is not installed."""
