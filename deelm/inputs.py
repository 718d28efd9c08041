"""What encode and the trainer accept as input, checked and packed for the C core."""
import numpy as np


def check_device(device):
    """deelm computes on the CPU: None, "cpu", torch.device("cpu") or a list
    of them (sentence-transformers' multi-process form)."""
    devices = list(device) if isinstance(device, (list, tuple)) else [device]
    for dev in devices:
        if dev is not None and str(dev) != "cpu":
            raise ValueError(f"deelm runs on the CPU; device={device!r} is not available")


def as_texts(sentences):
    """A string or an iterable of strings as a list of strings; TypeError
    naming the first item that is not one."""
    if isinstance(sentences, str):
        return [sentences]
    if isinstance(sentences, (bytes, bytearray)) or not hasattr(sentences, "__iter__"):
        raise TypeError(f"sentences must be a string or a list of strings, not "
                        f"{type(sentences).__name__}")
    sentences = list(sentences)
    for i, s in enumerate(sentences):
        if not isinstance(s, str):
            raise TypeError(f"sentences[{i}] is {type(s).__name__}, not str")
    return sentences


def int_ids(x):
    """One sentence's token ids as int32; floats, bools and other kinds are
    refused rather than truncated."""
    a = np.asarray(x)
    if not a.size:
        return np.zeros(0, dtype=np.int32)
    if a.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got {a.dtype} values")
    if a.min() < 0 or a.max() > np.iinfo(np.int32).max:
        raise ValueError(f"token ids must be in [0, 2**31), got {a.min()}..{a.max()}")
    return a.astype(np.int32, copy=False)


def pack_ids(ids):
    """Token id lists as the C core takes a batch: all ids end to end (int32
    [N]) and each sentence's start (int64 [n + 1])."""
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # one conversion per sentence, not per token
    tokens = (np.concatenate([int_ids(x) for x in ids]) if ids
              else np.zeros(0, dtype=np.int32))
    return tokens, offsets
