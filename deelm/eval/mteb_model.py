"""A DeeLM model in the shape the `mteb` package expects.

mteb 2.x hands `encode` a DataLoader of batches ({"text": [...]}) with the
task's metadata and the prompt type (query or document), checks the model
against its EncoderProtocol, and files results under the model's
`mteb_model_meta` (name and revision). MTEBModel gives each configuration of
a DeeLM its own ModelMeta: the name says the model file, k, pooling, prompt
and adapter; the revision is a sha256 of the model file, the adapter and the
settings, so two configurations never share a place in mteb's result cache.
mteb 1.x passes a list of strings and `task_name` / `prompt_type`; both work.
mteb itself is not a dependency of deelm: it is imported only when mteb asks
for the ModelMeta.
"""
import hashlib
import re
from pathlib import Path

from deelm.similarity import similarity_functions


def _slug(text):
    """A name part that is safe in a file name."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "model"


def configuration_name(model):
    """mteb model name of a DeeLM configuration, e.g.
    ``deelm/SmolLM2-135M-Instruct.Q4_1-k21-mean-adapter-smollm2-135m-deelm``."""
    from deelm.saved_model import adapter_sha256

    path = Path(str(model.path))
    parts = [path.stem if path.is_file() else path.name, f"k{model.bidirectional_from}",
             model.pooling]
    if model.prompt:
        parts.append("prompt-" + hashlib.sha256(model.prompt.encode()).hexdigest()[:8])
    if model.adapter is not None:
        where = model.adapter_path
        parts.append("adapter-" + (Path(str(where)).name if where is not None
                                   else adapter_sha256(model)[:8]))
    if model.truncate_dim is not None:
        parts.append(f"dim{model.truncate_dim}")
    return "deelm/" + _slug("-".join(parts))


def model_meta(model, name=None):
    """An mteb ModelMeta describing `model` (a DeeLM) as it is configured now."""
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    from deelm.saved_model import configuration_sha256

    total = model.num_parameters()
    embedding = total - model.num_parameters(exclude_embeddings=True)
    path = Path(str(model.path))
    return ModelMeta(
        loader=None, name=name or configuration_name(model),
        revision=configuration_sha256(model), release_date=None, languages=None,
        n_parameters=total, n_embedding_parameters=embedding, memory_usage_mb=None,
        max_tokens=model.max_seq_length,
        embed_dim=model.truncate_dim or model.get_sentence_embedding_dimension(),
        license="not specified", open_weights=True, public_training_code=None,
        public_training_data=None, framework=["NumPy"], reference=None,
        similarity_fn_name=ScoringFunction(model.similarity_fn_name),
        use_instructions=bool(model.prompt or any(model.prompts.values())),
        training_datasets=None, adapted_from=path.stem if path.is_file() else path.name,
        modalities=["text"], model_type=["dense"])


def prompt_name_for(prompts, task_name=None, task_type=None, prompt_type=None):
    """The key of `prompts` for a task, in mteb's order of preference:
    "<task name>-<prompt type>", "<task name>", "<task type>-<prompt type>",
    "<task type>", "<prompt type>" (query / document); None if none is there."""
    kind = getattr(prompt_type, "value", prompt_type)
    candidates = [f"{task_name}-{kind}" if task_name and kind else None, task_name,
                  f"{task_type}-{kind}" if task_type and kind else None, task_type, kind]
    return next((c for c in candidates if c and c in prompts), None)


class MTEBModel:
    """Wraps a DeeLM for mteb.evaluate(...).

    prompts: mteb-style prompts by task name, task type and prompt type
    ({"query": "...", "STSBenchmark": "...", "Retrieval-document": "..."});
    default: the model's own `prompts` (its "query" / "document" ones). An
    empty or missing prompt leaves the model's `prompt` setting in force.
    name: the ModelMeta name (default: made from the configuration).
    """

    def __init__(self, model, batch_size=32, show_progress_bar=False, prompts=None, name=None):
        self.model = model
        self.batch_size = batch_size
        self.show_progress_bar = show_progress_bar
        self.prompts = model.prompts if prompts is None else dict(prompts)
        self.name = name

    @property
    def mteb_model_meta(self):
        """The ModelMeta of the model as it is configured now (it follows
        later changes of k, pooling, prompt or adapter)."""
        return model_meta(self.model, self.name)

    @staticmethod
    def _texts(inputs):
        if isinstance(inputs, str):
            return [inputs]
        if isinstance(inputs, (list, tuple)) and all(isinstance(s, str) for s in inputs):
            return list(inputs)
        texts = []
        for batch in inputs:  # mteb 2.x: a DataLoader of {"text": [...], ...}
            if not isinstance(batch, dict) or "text" not in batch:
                raise TypeError("expected a list of strings or batches with a 'text' field")
            texts.extend(batch["text"])
        return texts

    def prompt_for(self, task_metadata=None, prompt_type=None, task_name=None):
        """The prompt a task's inputs get, or None for the model's own."""
        name = getattr(task_metadata, "name", None) or task_name
        key = prompt_name_for(self.prompts, name, getattr(task_metadata, "type", None),
                              prompt_type)
        return (self.prompts[key] or None) if key is not None else None

    def encode(self, inputs, *, task_metadata=None, hf_split=None, hf_subset=None,
               prompt_type=None, task_name=None, batch_size=None, show_progress_bar=None,
               precision="float32", **kwargs):
        return self.model.encode(
            self._texts(inputs), prompt=self.prompt_for(task_metadata, prompt_type, task_name),
            batch_size=batch_size or self.batch_size, precision=precision,
            show_progress_bar=self.show_progress_bar if show_progress_bar is None else show_progress_bar)

    def similarity(self, embeddings1, embeddings2):
        return similarity_functions(self.model.similarity_fn_name)[0](embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        return similarity_functions(self.model.similarity_fn_name)[1](embeddings1, embeddings2)

    def __repr__(self):
        return f"MTEBModel({self.model!r})"
