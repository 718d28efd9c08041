"""Exceptions deelm raises for bad models and bad input."""


import json


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


class TrainingDataError(DeeLMError, ValueError):
    """A training data file is missing, empty or has a malformed row.

    ``path`` is the file, ``line`` the 1-based line number of the bad row (None
    when the problem is the file as a whole) and ``reason`` what is wrong.
    """

    def __init__(self, path, reason, line=None):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = self.path if line is None else f"{self.path}, line {line}"
        super().__init__(f"{where}: {reason}")


class LoraConfigError(DeeLMError, ValueError):
    """A LoRA configuration is invalid or does not fit the model it is meant for."""


class AdapterError(ModelFileError):
    """A LoRA adapter directory or file is missing, corrupt, unsupported or does
    not fit the model. ``path`` names the file (or directory) at fault."""


class CheckpointError(ModelFileError):
    """A training checkpoint is incomplete, corrupt or belongs to another model."""


class SavedModelError(ModelFileError):
    """A folder written by save_pretrained cannot be reloaded as it was saved:
    its record is malformed, or the base model it names moved or changed."""


def read_json(path, error, what="not valid JSON"):
    """The JSON value in file `path`; unreadable text or JSON raises
    ``error(path, reason)`` (one of the errors above that take a path)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(path, f"{what} ({e})") from None
