"""What the integrations share: getting a model and embedding as a query or as a document.

Vector stores compare embeddings by L2 distance or inner product; the
integrations return unit vectors by default, so every store ranks by cosine.
"""
import importlib
import os


def import_for(module, extra):
    """Imports a library an integration needs, saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this deelm integration needs {module}: "
                          f'pip install "deelm[{extra}]"') from e


def resolve_model(model, load_kwargs):
    """A DeeLM (or anything with encode) as given, else one loaded by
    DeeLM.from_pretrained(model, **load_kwargs): model is then a path or None
    (the default model)."""
    if model is None or isinstance(model, (str, os.PathLike)):
        from deelm.model import DeeLM

        return DeeLM.from_pretrained(model, **load_kwargs)
    if load_kwargs:
        raise TypeError(f"from_pretrained arguments ({', '.join(load_kwargs)}) only apply when the "
                        "model is a path or None, not an already loaded model")
    if not callable(getattr(model, "encode", None)):
        raise TypeError(f"model must be a DeeLM, a model path or None, not {type(model).__name__}")
    return model


def embed(model, texts, role, prompt=None, **encode_kwargs):
    """Embeds texts as queries (role "query") or documents ("document"):
    float32 [n, d]. An explicit prompt wins; otherwise the model's
    encode_query / encode_document, which apply its own query and document
    prompts, and for a model without them its plain encode (its one prompt)."""
    if prompt is not None:
        return model.encode(texts, prompt=prompt, **encode_kwargs)
    encode_role = getattr(model, f"encode_{role}", None)
    if encode_role is None:
        return model.encode(texts, **encode_kwargs)
    return encode_role(texts, **encode_kwargs)


def as_text_list(texts):
    """texts as a list, refusing a lone string (it would be embedded as one
    text and return one vector where the caller expects a list of them)."""
    if isinstance(texts, str):
        raise TypeError("expected a list of strings, got a single string (wrap it in a list, or "
                        "embed it as a query)")
    return list(texts)


def as_text(text):
    if not isinstance(text, str):
        raise TypeError(f"expected a string, not {type(text).__name__}")
    return text
