"""Training data for contrastive fine-tuning: JSONL readers and batching.

Two row formats are read, the ones the AnglE/BeLLM training code uses:

* **triplets** ``{"text": ..., "positive": ..., "negative": ...}`` (NLI premise,
  entailed and contradicting hypothesis). ``negative`` is optional per file:
  either every row has it or none does.
* **scored pairs** ``{"sentence1": ..., "sentence2": ..., "score": ...}``, with
  ``text1``/``text2`` accepted for the sentences and ``label`` for the score.

Files are read line by line (never whole), so a file of any size in this format
works; only the columns are kept in memory. Every malformed row raises a
:class:`~deelm.errors.TrainingDataError` naming the file and the 1-based line.

Batching (:func:`iter_batches`) shuffles deterministically per (seed, epoch) and
keeps every sentence at most once per batch: a sentence repeated in a batch
would be its own in-batch negative (AnglE filters such rows for the same
reason). An example that would repeat a sentence is deferred to a later batch,
not lost; one that repeats a sentence within itself (say text == positive) can
never be placed and is dropped. Both are counted.
"""
import json
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deelm.errors import TrainingDataError

TRIPLET_FIELDS = ("text", "positive", "negative")
# Canonical pair field -> the names accepted for it, in order of preference.
PAIR_FIELDS = {
    "sentence1": ("sentence1", "text1"),
    "sentence2": ("sentence2", "text2"),
    "score": ("score", "label"),
}


def iter_jsonl(path):
    """Yields ``(line_number, row)`` for each non-blank line of a JSONL file.

    Line numbers are 1-based and count blank lines, so they point at the line
    an editor shows. Raises TrainingDataError for a missing file, bytes that
    are not UTF-8, invalid JSON and rows that are not JSON objects.
    """
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise TrainingDataError(path, f"cannot open: {e.strerror or e}") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                # A byte-order mark some editors put first is not part of the JSON.
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise TrainingDataError(path, f"not UTF-8 text ({e.reason} at byte {e.start})",
                                        lineno) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainingDataError(path, f"invalid JSON: {e.msg} (column {e.colno})",
                                        lineno) from None
            except RecursionError:
                raise TrainingDataError(path, "JSON nested too deeply", lineno) from None
            if not isinstance(row, dict):
                raise TrainingDataError(
                    path, f"expected a JSON object, got {type(row).__name__}", lineno)
            yield lineno, row


def _field(path, lineno, row, names):
    """The value of the first of `names` present in `row`, or an error naming them."""
    for name in names:
        if name in row:
            return name, row[name]
    wanted = " or ".join(repr(n) for n in names)
    raise TrainingDataError(path, f"missing field {wanted}", lineno)


def _text(path, lineno, row, names):
    name, value = _field(path, lineno, row, names)
    if not isinstance(value, str):
        raise TrainingDataError(
            path, f"field {name!r} must be a string, got {type(value).__name__}", lineno)
    if not value.strip():
        raise TrainingDataError(path, f"field {name!r} is empty", lineno)
    return value


def _score(path, lineno, row):
    name, value = _field(path, lineno, row, PAIR_FIELDS["score"])
    # bool is an int subclass in Python, but true/false is a label, not a score.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrainingDataError(
            path, f"field {name!r} must be a number, got {json.dumps(value)}", lineno)
    if not math.isfinite(value):
        raise TrainingDataError(path, f"field {name!r} is not finite ({value})", lineno)
    return float(value)


class _Examples:
    """Columns of one loaded file; subclasses name the columns."""

    kind = None
    columns = ()

    def __len__(self):
        return len(self.lines)

    def head(self, n):
        """The first n examples (all of them if there are fewer), as a new object."""
        import dataclasses

        cut = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in cut.items():
            if name != "path" and value is not None:
                cut[name] = value[:n]
        return type(self)(**cut)

    def text_columns(self):
        """The text columns present, in the order examples list them."""
        return [getattr(self, c) for c in self.columns if getattr(self, c) is not None]

    def text_ids(self):
        """int64 [n, k]: each example's texts as ids, equal ids for equal strings.

        Batching compares ids rather than strings; computed once and cached.
        """
        if getattr(self, "_ids", None) is None:
            ids = {}
            cols = self.text_columns()
            out = np.empty((len(self), len(cols)), dtype=np.int64)
            for j, col in enumerate(cols):
                out[:, j] = [ids.setdefault(s, len(ids)) for s in col]
            self._ids = out
        return self._ids


@dataclass(eq=False)
class Triplets(_Examples):
    """Triplet rows of one file as columns; ``negative`` is None when the file has none.

    ``lines`` holds each example's 1-based line number in ``path``.
    """

    path: str
    text: list
    positive: list
    negative: list | None
    lines: np.ndarray

    kind = "triplet"
    columns = TRIPLET_FIELDS


@dataclass(eq=False)
class Pairs(_Examples):
    """Scored pair rows of one file as columns (``scores`` float64)."""

    path: str
    sentence1: list
    sentence2: list
    scores: np.ndarray
    lines: np.ndarray

    kind = "pair"
    columns = ("sentence1", "sentence2")


def _first_row(path, rows):
    first = next(rows, None)
    if first is None:
        raise TrainingDataError(path, "no data: the file is empty or has only blank lines")
    return first


def _read_triplets(path, first, rows):
    lineno0, row0 = first
    with_negative = "negative" in row0
    text, positive, negative, lines = [], [], ([] if with_negative else None), []
    for lineno, row in _chain(first, rows):
        text.append(_text(path, lineno, row, ("text",)))
        positive.append(_text(path, lineno, row, ("positive",)))
        if with_negative:
            negative.append(_text(path, lineno, row, ("negative",)))
        elif "negative" in row:
            raise TrainingDataError(
                path, f"has a 'negative' field but line {lineno0} has none: either every "
                "row of a file has a negative or none does", lineno)
        lines.append(lineno)
    return Triplets(str(path), text, positive, negative, np.asarray(lines, dtype=np.int64))


def _read_pairs(path, first, rows):
    s1, s2, scores, lines = [], [], [], []
    for lineno, row in _chain(first, rows):
        s1.append(_text(path, lineno, row, PAIR_FIELDS["sentence1"]))
        s2.append(_text(path, lineno, row, PAIR_FIELDS["sentence2"]))
        scores.append(_score(path, lineno, row))
        lines.append(lineno)
    return Pairs(str(path), s1, s2, np.asarray(scores, dtype=np.float64),
                 np.asarray(lines, dtype=np.int64))


def _chain(first, rows):
    yield first
    yield from rows


def load_triplets(path):
    """Reads a triplet JSONL file (``text``, ``positive``, optional ``negative``)."""
    rows = iter_jsonl(path)
    return _read_triplets(path, _first_row(path, rows), rows)


def load_pairs(path):
    """Reads a scored-pair JSONL file (``sentence1``/``text1``, ``sentence2``/``text2``,
    ``score``/``label``)."""
    rows = iter_jsonl(path)
    return _read_pairs(path, _first_row(path, rows), rows)


def load_training_data(path):
    """Reads triplets or scored pairs, whichever the first non-blank row holds."""
    rows = iter_jsonl(path)
    first = _first_row(path, rows)
    lineno, row = first
    if "text" in row:
        return _read_triplets(path, first, rows)
    if any(n in row for n in PAIR_FIELDS["sentence1"]):
        return _read_pairs(path, first, rows)
    raise TrainingDataError(
        path, f"cannot tell the format from the fields {sorted(row)}: expected triplets "
        "(text, positive[, negative]) or scored pairs (sentence1, sentence2, score)", lineno)


@dataclass(frozen=True, eq=False)
class Batch:
    """One training batch: the sentences to encode once each, and index arrays into them.

    Triplet batches set ``anchor_idx``, ``positive_idx`` and ``negative_idx``
    (None without negatives); pair batches set ``idx1``, ``idx2`` and
    ``scores``. ``examples`` are the 0-based rows of the data in this batch.
    """

    sentences: list
    examples: np.ndarray
    anchor_idx: np.ndarray | None = None
    positive_idx: np.ndarray | None = None
    negative_idx: np.ndarray | None = None
    idx1: np.ndarray | None = None
    idx2: np.ndarray | None = None
    scores: np.ndarray | None = None

    @property
    def kind(self):
        return "triplet" if self.anchor_idx is not None else "pair"

    def __len__(self):
        return len(self.examples)

    def scored_pairs(self):
        """(idx1, idx2, labels) of the pairs the ranking losses compare.

        For triplets these are (anchor, positive) with label 1 and (anchor,
        negative) with label 0, as AnglE builds them.
        """
        if self.kind == "pair":
            return self.idx1, self.idx2, self.scores
        b = len(self.anchor_idx)
        if self.negative_idx is None:
            return self.anchor_idx, self.positive_idx, np.ones(b)
        return (np.concatenate([self.anchor_idx, self.anchor_idx]),
                np.concatenate([self.positive_idx, self.negative_idx]),
                np.concatenate([np.ones(b), np.zeros(b)]))


def make_batch(data, examples):
    """The Batch of the given example rows (0-based) of `data`.

    Sentences are listed column by column (all anchors, then all positives...)
    and each distinct string once, so repeated strings share one embedding.
    """
    examples = np.asarray(examples, dtype=np.int64)
    ids = data.text_ids()[examples]            # [b, k]
    flat = ids.T.reshape(-1)                   # column-major: anchors, positives, ...
    uniq, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    order = np.argsort(first)                  # keep first-appearance order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    index = rank[inverse].reshape(ids.shape[1], -1)
    cols = data.text_columns()
    sentences = [cols[k][examples[j]] for k, j in
                 (divmod(int(p), len(examples)) for p in first[order])]
    if data.kind == "triplet":
        neg = index[2] if ids.shape[1] == 3 else None
        return Batch(sentences, examples, anchor_idx=index[0], positive_idx=index[1],
                     negative_idx=neg)
    return Batch(sentences, examples, idx1=index[0], idx2=index[1],
                 scores=data.scores[examples])


class EpochBatches:
    """The batches of one epoch, planned up front so their number is known.

    Deterministic for (seed, epoch). Attributes: ``n_deferred`` examples that
    waited for a later batch because a sentence of theirs was already in the
    current one, ``n_dropped`` examples that repeat a sentence within
    themselves and so fit no batch (``dropped_lines`` gives their line numbers).
    With ``unique_texts=False`` no example is deferred or dropped and repeated
    strings simply share an embedding.
    """

    def __init__(self, data, batch_size, seed=0, epoch=0, unique_texts=True):
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if len(data) == 0:
            raise ValueError("no examples to batch")
        self.data = data
        self.batch_size = int(batch_size)
        self.seed, self.epoch = int(seed), int(epoch)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(data))
        if unique_texts:
            self.plan, deferred, dropped = _plan_unique(data.text_ids(), order, self.batch_size)
        else:
            self.plan = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            deferred, dropped = 0, np.empty(0, dtype=np.int64)
        self.n_deferred = deferred
        self.n_dropped = len(dropped)
        self.dropped_lines = data.lines[dropped]

    def __len__(self):
        return len(self.plan)

    def __iter__(self):
        for examples in self.plan:
            yield make_batch(self.data, examples)

    def __repr__(self):
        return (f"EpochBatches({len(self)} batches of <= {self.batch_size}, epoch {self.epoch}, "
                f"{self.n_deferred} deferred, {self.n_dropped} dropped)")


def _plan_unique(ids, order, batch_size):
    """Greedy batches in `order` with no id twice per batch.

    Deferred examples are retried first, oldest first, for every new batch,
    so each waits as little as possible and none is lost.
    """
    k = ids.shape[1]
    self_dup = np.zeros(len(ids), dtype=bool)
    for a in range(k):
        for b in range(a + 1, k):
            self_dup |= ids[:, a] == ids[:, b]
    dropped = order[self_dup[order]]
    stream = order[~self_dup[order]].tolist()
    plan, deferred, n_deferred, pos = [], deque(), 0, 0
    while pos < len(stream) or deferred:
        batch, seen, waiting = [], set(), deque()
        for i in deferred:
            row = ids[i].tolist()
            if len(batch) < batch_size and seen.isdisjoint(row):
                batch.append(i)
                seen.update(row)
            else:
                waiting.append(i)
        deferred = waiting
        while len(batch) < batch_size and pos < len(stream):
            i = stream[pos]
            pos += 1
            row = ids[i].tolist()
            if seen.isdisjoint(row):
                batch.append(i)
                seen.update(row)
            else:
                deferred.append(i)
                n_deferred += 1
        plan.append(np.asarray(batch, dtype=np.int64))
    return plan, n_deferred, dropped


def concat_examples(parts):
    """One Triplets or Pairs holding the rows of several loaded files in order.

    The parts must be of one kind (and, for triplets, either all with or all
    without negatives): their rows are then batched together, so in-batch
    negatives come from every file. ``lines`` keeps each row's line number in
    its own file; ``path`` lists the files.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("no data to concatenate")
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for p in parts[1:]:
        if type(p) is not type(first) or [c is None for c in p.text_columns()] != \
                [c is None for c in first.text_columns()] or \
                (isinstance(p, Triplets) and (p.negative is None) != (first.negative is None)):
            raise TrainingDataError(p.path, f"cannot be batched with {first.path}: one holds "
                                    "triplets with negatives, the other not, or scored pairs")
    import dataclasses

    merged = {}
    for f in dataclasses.fields(first):
        values = [getattr(p, f.name) for p in parts]
        if f.name == "path":
            merged[f.name] = " + ".join(str(v) for v in values)
        elif values[0] is None:
            merged[f.name] = None
        elif isinstance(values[0], np.ndarray):
            merged[f.name] = np.concatenate(values)
        else:
            merged[f.name] = [x for v in values for x in v]
    return type(first)(**merged)


def group_sources(parts):
    """Loaded files grouped for batching: all triplet files with negatives
    together, those without together, all scored-pair files together, each
    group concatenated (:func:`concat_examples`). Order: first appearance."""
    groups = {}
    for p in parts:
        key = (p.kind, isinstance(p, Triplets) and p.negative is None)
        groups.setdefault(key, []).append(p)
    return [concat_examples(g) for g in groups.values()]


class MixedBatches:
    """The batches of one epoch over several data sets.

    Each batch comes from one set (a triplet batch and a scored-pair batch
    train with different losses); the sets' batches are interleaved in a
    random order fixed by (seed, epoch), each set keeping its own order, so
    every set is spread over the whole epoch. With one set this is exactly
    that set's :class:`EpochBatches`. Iterating yields (set index, Batch).
    """

    def __init__(self, datasets, batch_size, seed=0, epoch=0, unique_texts=True):
        self.parts = [EpochBatches(d, batch_size, seed=seed, epoch=epoch, unique_texts=unique_texts)
                      for d in datasets]
        tags = np.concatenate([np.full(len(p), j, dtype=np.int64) for j, p in enumerate(self.parts)])
        if len(self.parts) > 1:
            np.random.default_rng([int(seed), int(epoch), len(self.parts)]).shuffle(tags)
        self.order = tags

    def __len__(self):
        return len(self.order)

    def __iter__(self):
        plans = [iter(p) for p in self.parts]
        for j in self.order:
            yield int(j), next(plans[j])

    @property
    def n_dropped(self):
        return sum(p.n_dropped for p in self.parts)

    @property
    def n_deferred(self):
        return sum(p.n_deferred for p in self.parts)


def iter_batches(examples, batch_size, seed=0, epoch=0, unique_texts=True):
    """The batches of one epoch of `examples` (Triplets or Pairs) as an EpochBatches.

    Iterate it for :class:`Batch` objects; ``len()`` is the number of batches
    and ``n_deferred`` / ``n_dropped`` say how many examples were moved or left out.
    """
    return EpochBatches(examples, batch_size, seed=seed, epoch=epoch, unique_texts=unique_texts)
