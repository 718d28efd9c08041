"""deelm: sentence embeddings from decoder-only LLMs by the DeeLM method.

    >>> import deelm
    >>> model = deelm.DeeLM.from_pretrained()          # SmolLM2-135M-Instruct
    >>> emb = model.encode(["A cat sits.", "A dog runs."])
    >>> model.similarity(emb, emb)
"""
from .default_model import DEFAULT_FILE, DEFAULT_PACKAGE, MODEL_ENV, resolve_model_path
from .errors import DeeLMError, ModelFileError, ModelNotFoundError, UnsupportedModelError
from .model import PAPER_PROMPT, POOLINGS, DeeLM, cos_sim
from .mteb_model import MTEBModel
from . import analysis  # turning point, backward-dependency probe

__version__ = "0.1.0"

__all__ = [
    "DeeLM", "MTEBModel", "PAPER_PROMPT", "POOLINGS", "cos_sim", "resolve_model_path",
    "DeeLMError", "ModelFileError", "ModelNotFoundError", "UnsupportedModelError",
    "DEFAULT_FILE", "DEFAULT_PACKAGE", "MODEL_ENV", "__version__", "analysis",
]
