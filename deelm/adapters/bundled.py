"""The DeeLM adapters shipped inside the package, found by the weights they were trained on."""
import hashlib
import json
from pathlib import Path

# DeeLM adapters trained for packaged models (python -m deelm train; see the
# README), shipped inside the package so those models embed as DeeLM models
# out of the box. Each folder's deelm_config.json names the weights it was
# trained on by content (FINGERPRINT_KEY), so a model is recognised wherever
# its file lives and whatever it is called.
ADAPTERS_DIR = Path(__file__).resolve().parent
BUNDLED_ADAPTER = ADAPTERS_DIR / "smollm2-135m-deelm"  # the default model's
FINGERPRINT_KEY = "base_model_fingerprint"


def model_fingerprint(tensors):
    """A content hash of a model's weights, cheap enough for every load:
    sha256 over the name, type, shape and stored bytes of every normalisation
    weight (a few hundred KB, different in every fine-tune, while two files
    of one architecture share their metadata). `tensors` is
    ModelFile.tensors."""
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
