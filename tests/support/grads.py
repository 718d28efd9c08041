"""LoRA gradients of deelm's training pass and of transformers + PEFT on the same weights.

The loss is L = sum(pooled * R) with a fixed random R, so each side's gradient
is the LoRA parameters' response to one known d L / d pooled. torch and peft
are imported only inside torch_grads.
"""
import numpy as np

from conftest import bidirectional_layers, padded_batch
from deelm.adapters.lora import LoraConfig, LoraLayout
from deelm.adapters.peft import adapter_tensors
from deelm.inputs import pack_ids
from support.reference import report

# sentences of the gradient checks: a long one, a one-letter one, non-ASCII
SENTENCES = ["A cat sat on the mat.", "x", "the heat in the station was rather oppressive today",
             "Üñíçødé and digits 12345!"]

def batch_arrays(model, sentences):
    ids = [e.ids for e in model.tokenize(sentences)]
    tokens, offsets = pack_ids(ids)
    pool = np.stack([np.zeros(len(ids), np.int64), np.diff(offsets)], 1)
    return ids, tokens, offsets, pool


def random_adapter(model, layers, seed=0, r=4):
    """LoRA on every module of `layers`, A and B random (B != 0, so every
    gradient path is live), applied to `model`."""
    layout = LoraLayout(LoraConfig(r=r, alpha=2 * r, layers=tuple(layers)), model._core.config)
    params = (np.random.default_rng(seed).standard_normal(layout.size) * 0.1).astype(np.float32)
    model.set_adapter(layout, params)
    return layout, params


def deelm_grads(model, sentences, k, train_from, d_pooled_seed=1, threads=2):
    """pooled, dL/dparams for L = sum(pooled * R) with a fixed random R."""
    _, tokens, offsets, pool = batch_arrays(model, sentences)
    core = model._core
    x = core.residual(tokens, offsets, train_from, k, threads)
    pooled = core.train_forward(x, offsets, pool, train_from, k, threads)
    R = np.random.default_rng(d_pooled_seed).standard_normal(pooled.shape).astype(np.float32)
    grad = np.zeros_like(model.adapter[1])
    core.train_backward(R, grad)
    return pooled, R, grad


def torch_grads(hf_model, adapter_dir, ids, k, R, windows=None):
    """The same loss through transformers + PEFT: pooled [n, d], {key: grad}
    (windows: the layers' sliding windows, conftest.bidirectional_layers)."""
    import peft
    import torch

    pm = peft.PeftModel.from_pretrained(hf_model, str(adapter_dir), is_trainable=True)
    try:
        for mod in pm.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        input_ids, keep = padded_batch(ids)
        with bidirectional_layers(pm.base_model.model.layers, keep, k, windows):
            out = pm(input_ids=input_ids, attention_mask=keep).last_hidden_state
        pooled = (out * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        (pooled * torch.tensor(R)).sum().backward()
        grads = {n.replace(".default", ""): p.grad.numpy().copy()
                 for n, p in pm.named_parameters() if "lora_" in n}
        return pooled.detach().numpy(), grads
    finally:
        pm.unload()  # takes the LoRA layers out of hf_model again


def compare(layout, grad, ref, label):
    mine = adapter_tensors(layout, grad)  # q/k rows back in Hugging Face order
    assert set(mine) == set(ref)
    worst = max(np.abs(mine[key] - ref[key]).max() / (np.abs(ref[key]).max() + 1e-12)
                for key in ref)
    report(f"{label}: LoRA gradient max rel. error vs torch autograd", worst)
    return worst
