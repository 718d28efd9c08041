"""A DeeLM saved as a folder (save_pretrained) and read back (from_pretrained).

The folder holds deelm_model.json (the base model's path and sha256, every
setting that shapes an embedding) and adapter/ (the LoRA adapter's files, if
one is applied). The base model itself is referenced, not copied (it can be
gigabytes); reloading checks its sha256 and says so when the file moved or
changed. The same hashes make the content hash that names a configuration in
mteb's result cache (deelm.eval.mteb_model).
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

from deelm.errors import SavedModelError, read_json

SAVED_MODEL_FILE = "deelm_model.json"
ADAPTER_FOLDER = "adapter"
FORMAT = "deelm-model"
FORMAT_VERSION = 1
# The settings a saved folder carries, as from_pretrained's keyword arguments.
SAVED_SETTINGS = ("bidirectional_from", "pooling", "prompt", "prompts", "default_prompt_name",
                  "max_seq_length", "compute_precision", "isa", "similarity_fn_name",
                  "truncate_dim")
# Files of a Hugging Face model directory that deelm reads (the weights are
# every *.safetensors); anything else in the folder does not change the model.
_HF_FILES = ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
             "special_tokens_map.json")

_hash_cache = {}  # (path, size, mtime_ns) -> sha256 hex


def file_sha256(path):
    """sha256 of a file's bytes, remembered for this process while the file's
    size and modification time stay the same."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        _hash_cache[key] = h.hexdigest()
    return _hash_cache[key]


def model_files(path):
    """The files that make a model: a GGUF file itself, or those of a Hugging
    Face directory that deelm reads."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    names = [n for n in _HF_FILES if (path / n).is_file()]
    names += sorted(p.name for p in path.glob("*.safetensors"))
    names += sorted(p.name for p in path.glob("*.safetensors.index.json"))
    return [path / n for n in names]


def content_sha256(path):
    """sha256 of a model file, or of a directory's files (each name and its
    sha256, in order)."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in model_files(path):
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def adapter_sha256(model):
    """sha256 of the applied adapter: of its folder's files when it came from
    one, else of its layout and parameters in memory; None without one."""
    if model.adapter is None:
        return None
    h = hashlib.sha256()
    if model.adapter_path is not None:
        for f in sorted(Path(model.adapter_path).iterdir()):
            if f.is_file():
                h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    else:
        layout, params = model.adapter
        for a in (layout.table, layout.scales, params):
            h.update(a.tobytes())
    return h.hexdigest()


def settings_of(model):
    """The settings a saved folder carries, from the model as it is now."""
    options = model.load_options
    return {k: options[k] for k in SAVED_SETTINGS}


def configuration_sha256(model):
    """One hash of everything that decides the model's embeddings: the base
    model's content, the adapter's, and the settings."""
    record = {"model": content_sha256(model.path), "adapter": adapter_sha256(model),
              "settings": settings_of(model)}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def save_model(model, directory):
    """Writes `model` as a folder that DeeLM.from_pretrained(directory)
    reloads; replaces the folder atomically if it exists."""
    from deelm import __version__
    from deelm.adapters.peft import write_adapter_files
    from deelm.io.atomic import atomic_directory

    directory = Path(directory)
    if directory.exists() and not (directory / SAVED_MODEL_FILE).is_file():
        if not directory.is_dir() or any(directory.iterdir()):
            raise FileExistsError(f"{directory} exists and is not a saved deelm model folder; "
                                  "save into a new or empty folder")
    base = Path(model.path).resolve()
    record = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "deelm_version": __version__,
        "base_model": {"path": str(base), "sha256": content_sha256(base),
                       "kind": "huggingface_directory" if base.is_dir() else "gguf"},
        "adapter": None,
        **settings_of(model),
    }
    with atomic_directory(directory) as tmp:
        if model.adapter is not None:
            (tmp / ADAPTER_FOLDER).mkdir()
            if model.adapter_path is not None:
                for f in Path(model.adapter_path).iterdir():
                    if f.is_file():
                        shutil.copy2(f, tmp / ADAPTER_FOLDER / f.name)
            else:
                write_adapter_files(tmp / ADAPTER_FOLDER, *model.adapter)
            record["adapter"] = ADAPTER_FOLDER
        (tmp / SAVED_MODEL_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return directory


def is_saved_model(path):
    return isinstance(path, (str, os.PathLike)) and (Path(path) / SAVED_MODEL_FILE).is_file()


def read_saved_model(directory):
    """from_pretrained's keyword arguments stored in a saved folder, after
    checking that the base model is still the file that was saved."""
    directory = Path(directory)
    path = directory / SAVED_MODEL_FILE
    record = read_json(path, SavedModelError)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise SavedModelError(path, f"not a saved deelm model (no \"format\": \"{FORMAT}\")")
    if record.get("format_version") != FORMAT_VERSION:
        raise SavedModelError(path, f"format version {record.get('format_version')!r}; this "
                                    f"deelm reads version {FORMAT_VERSION}")
    base = record.get("base_model")
    if not isinstance(base, dict) or not isinstance(base.get("path"), str) \
            or not isinstance(base.get("sha256"), str):
        raise SavedModelError(path, "base_model must hold the model's path and sha256")
    missing = [k for k in SAVED_SETTINGS if k not in record]
    if missing:
        raise SavedModelError(path, f"lacks the setting(s) {', '.join(missing)}")
    model = Path(base["path"])
    if not model.exists():
        raise SavedModelError(path, f"the base model {model} (sha256 {base['sha256']}) is gone; "
                                    "it was moved or deleted since the model was saved")
    found = content_sha256(model)
    if found != base["sha256"]:
        raise SavedModelError(path, f"the base model {model} changed since the model was saved "
                                    f"(sha256 {found}, saved {base['sha256']})")
    adapter = record.get("adapter")
    if adapter is not None:
        adapter = directory / adapter
        if not adapter.is_dir():
            raise SavedModelError(path, f"its adapter folder {adapter} is missing")
    return dict({k: record[k] for k in SAVED_SETTINGS}, model=str(model), adapter=adapter)
