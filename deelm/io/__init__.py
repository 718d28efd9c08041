"""Model files in, ModelFile out: GGUF (deelm.io.gguf), Hugging Face folders
(deelm.io.hf), their tokenizers, the default model's package, and the header
summary `deelm info` prints. Nothing here imports adapters, the model or the
trainer."""
from pathlib import Path

from deelm.io.gguf import read_gguf
from deelm.io.hf import read_hf_checkpoint


def read_model(path):
    """Reads a model for the C core: a Hugging Face directory (config.json +
    safetensors) or a GGUF file. Raises ModelFileError naming the file."""
    if Path(path).is_dir():
        return read_hf_checkpoint(path)
    return read_gguf(path)
