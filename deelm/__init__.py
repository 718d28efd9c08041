"""deelm: sentence embeddings from decoder-only LLMs by the DeeLM method.

    >>> import deelm
    >>> model = deelm.DeeLM.from_pretrained()          # SmolLM2-135M-Instruct
    >>> emb = model.encode(["A cat sits.", "A dog runs."])
    >>> model.similarity(emb, emb)
"""
from deelm.io.default_model import DEFAULT_FILE, DEFAULT_PACKAGE, MODEL_ENV, resolve_model_path
from deelm.errors import DeeLMError, ModelFileError, ModelNotFoundError, UnsupportedModelError
from deelm.model import DeeLM
from deelm.settings import PAPER_PROMPT, POOLINGS
from deelm.similarity import cos_sim
from deelm.eval.mteb_model import MTEBModel
from deelm.eval import analysis  # turning point, backward-dependency probe
from deelm import _moved

__version__ = "0.1.0"

_moved.install()  # the flat module names of deelm <= 0.1 still import, with a warning

__all__ = [
    "DeeLM", "MTEBModel", "PAPER_PROMPT", "POOLINGS", "cos_sim", "resolve_model_path",
    "DeeLMError", "ModelFileError", "ModelNotFoundError", "UnsupportedModelError",
    "DEFAULT_FILE", "DEFAULT_PACKAGE", "MODEL_ENV", "__version__", "analysis",
]
