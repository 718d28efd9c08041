"""STS evaluation the way MTEB scores it, on local files.

Tasks are read from a data folder in MTEB's layout (`<Task>/test.jsonl` with
`sentence1`, `sentence2`, `score`; JSONL, CSV, TSV or Parquet). Every unique
sentence of a run is encoded once. Scores follow MTEB's STS evaluator: cosine
similarity and negated Manhattan / Euclidean distances, each correlated with
the gold scores by Pearson and Spearman; `main_score` is the cosine Spearman,
stored in [-1, 1] and shown x100.

Two protocols, never mixed in one table:
- "mteb" (default): SICK-R is all 9,927 pairs (`SICK-R/test.jsonl`).
- "senteval": SICK-R is its 4,927-pair test split (`SICK-R/test.senteval.jsonl`),
  as the DeeLM/BeLLM paper tables are; optionally with the punctuation
  normalisation of the PromptEOL/AnglE SentEval batcher.
"""
import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deelm.errors import DeeLMError

TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICK-R")
PROTOCOLS = ("mteb", "senteval")
DATA_ENV = "DEELM_DATA"
_FORMATS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
_COLUMNS = ("sentence1", "sentence2", "score")

# The tasks with a dev split (MTEB's other STS tasks are test sets only):
# what `deelm eval --split dev` scores when no task is named.
DEV_TASKS = ("STSBenchmark",)


def default_tasks(split="test"):
    """The tasks evaluated when none are named: all seven, or those with a dev split."""
    return list(DEV_TASKS if split == "dev" else TASKS)


class DataError(DeeLMError, ValueError):
    """An evaluation file or folder is missing or malformed."""


@dataclass
class STSData:
    task: str
    path: Path
    sentence1: list
    sentence2: list
    scores: np.ndarray


@dataclass
class TaskResult:
    task: str
    protocol: str
    n_pairs: int
    scores: dict          # metric -> value in [-1, 1]
    path: Path = None
    evaluation_time: float = 0.0
    extra: dict = field(default_factory=dict)
    split: str = "test"

    @property
    def main_score(self):
        return self.scores["main_score"]


# ---- locating and reading data ---------------------------------------------

def default_data_dirs():
    """Where STS data is looked for, in order: $DEELM_DATA (its sts/ folder or
    itself), then ../shared/data/sts beside the working directory and beside
    the source checkout deelm runs from."""
    dirs = []
    env = os.environ.get(DATA_ENV)
    if env:
        dirs += [Path(env) / "sts", Path(env)]
    dirs.append(Path.cwd().parent / "shared" / "data" / "sts")
    checkout = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "sts"
    if checkout not in dirs:
        dirs.append(checkout)
    return dirs


def resolve_data_dir(data_dir=None):
    """The folder holding one sub-folder per task."""
    candidates = [Path(data_dir) / "sts", Path(data_dir)] if data_dir else default_data_dirs()
    for c in candidates:
        if c.is_dir() and any((c / t).is_dir() for t in TASKS):
            return c
    raise DataError("no STS data folder found; looked in: " + ", ".join(str(c) for c in candidates)
                    + f" (pass a data folder or set {DATA_ENV}; each task is <folder>/<Task>/test.jsonl)")


def task_file(data_dir, task, protocol="mteb", split="test"):
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    folder = Path(data_dir) / task
    if not folder.is_dir():
        raise DataError(f"task {task}: folder {folder} does not exist")
    stem = f"{split}.senteval" if (protocol == "senteval" and task == "SICK-R") else split
    for ext in _FORMATS:
        p = folder / (stem + ext)
        if p.is_file():
            return p
    raise DataError(f"task {task}: no {stem}{{{','.join(_FORMATS)}}} in {folder}")


def _rows(path):
    """(line number, dict) for each record of a JSONL / CSV / TSV / Parquet file.
    Every way a file can be unreadable becomes a DataError naming it (and the
    line, where there is one)."""
    ext = path.suffix.lower()
    if ext in (".jsonl", ".json"):
        with open(path, "rb") as fh:
            for i, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: line {i} is not UTF-8 text ({e.reason})") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
                except RecursionError:
                    raise DataError(f"{path}: line {i} nests JSON too deeply") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {i} is not a JSON object")
                yield i, row
    elif ext in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if ext == ".tsv" else ",",
                                    quoting=csv.QUOTE_NONE if ext == ".tsv" else csv.QUOTE_MINIMAL)
            rows = iter(reader)
            while True:
                try:
                    row = next(rows)
                except StopIteration:
                    return
                except (csv.Error, UnicodeDecodeError) as e:
                    raise DataError(f"{path}: line {reader.line_num + 1} cannot be read ({e})") from None
                yield reader.line_num, row
    elif ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError and others for bad files
            raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        for i, row in enumerate(table, 1):
            yield i, row
    else:
        raise DataError(f"{path}: unknown file type {ext!r} (use one of {', '.join(_FORMATS)})")


def load_sts_file(path, task=None):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    s1, s2, scores = [], [], []
    for i, row in _rows(path):
        missing = [c for c in _COLUMNS if c not in row]
        if missing:
            raise DataError(f"{path}: record {i} lacks column(s) {', '.join(missing)} "
                            f"(needs {', '.join(_COLUMNS)})")
        a, b = row["sentence1"], row["sentence2"]
        if not isinstance(a, str) or not isinstance(b, str):
            raise DataError(f"{path}: record {i}: sentence1 and sentence2 must be text")
        try:
            score = float(row["score"])
        except (TypeError, ValueError):
            raise DataError(f"{path}: record {i}: score {row['score']!r} is not a number") from None
        if not math.isfinite(score):
            raise DataError(f"{path}: record {i}: score {row['score']!r} is not finite")
        s1.append(a)
        s2.append(b)
        scores.append(score)
    if not scores:
        raise DataError(f"{path}: holds no sentence pairs")
    if len(s1) < 2:
        raise DataError(f"{path}: holds one sentence pair; a correlation needs at least two")
    return STSData(task or path.parent.name, path, s1, s2, np.asarray(scores, dtype=np.float64))


def load_task(task, data_dir=None, protocol="mteb", split="test"):
    return load_sts_file(task_file(resolve_data_dir(data_dir), task, protocol, split), task)


def senteval_normalize(s):
    """Punctuation normalisation of the PromptEOL/AnglE SentEval batcher: end
    every sentence with a period (a final '?' becomes '.'), and turn double
    quotes into single ones (they would clash with a prompt's quote)."""
    s = s.strip()
    if s and s[-1] not in ".?\"'":
        s += "."
    s = s.replace('"', "'")
    if s.endswith("?"):
        s = s[:-1] + "."
    return s


# ---- metrics ----------------------------------------------------------------

def _pearson(x, y):
    from scipy.stats import pearsonr

    return float(pearsonr(x, y)[0])


def _spearman(x, y):
    from scipy.stats import spearmanr

    return float(spearmanr(x, y)[0])


def sts_scores(emb1, emb2, gold, similarity_pairwise=None):
    """MTEB's STS metrics for paired embeddings [n, d] and gold scores [n]."""
    a = np.asarray(emb1, dtype=np.float64)
    b = np.asarray(emb2, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != gold.shape[0]:
        raise ValueError(f"embeddings {a.shape} / {b.shape} and {gold.shape[0]} gold scores do not pair up")
    na = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-300)
    nb = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-300)
    cosine = np.sum(na * nb, axis=1)
    manhattan = -np.sum(np.abs(a - b), axis=1)
    euclidean = -np.sqrt(np.sum((a - b) ** 2, axis=1))
    sim = cosine if similarity_pairwise is None else np.asarray(similarity_pairwise(emb1, emb2), np.float64)
    out = {
        "pearson": _pearson(gold, sim), "spearman": _spearman(gold, sim),
        "cosine_pearson": _pearson(gold, cosine), "cosine_spearman": _spearman(gold, cosine),
        "manhattan_pearson": _pearson(gold, manhattan), "manhattan_spearman": _spearman(gold, manhattan),
        "euclidean_pearson": _pearson(gold, euclidean), "euclidean_spearman": _spearman(gold, euclidean),
    }
    out["main_score"] = out["cosine_spearman"]
    return out


# ---- running ----------------------------------------------------------------

def encode_unique(model, sentences, batch_size=32, show_progress_bar=True, **encode_kwargs):
    """Embeds each distinct sentence once; returns (embeddings, index of each sentence)."""
    unique = list(dict.fromkeys(sentences))
    where = {s: i for i, s in enumerate(unique)}
    emb = model.encode(unique, batch_size=batch_size, show_progress_bar=show_progress_bar,
                       **encode_kwargs)
    return emb, np.fromiter((where[s] for s in sentences), dtype=np.int64, count=len(sentences))


def score_pairs(model, data, batch_size=64):
    """Cosine Spearman x 100 of `model` on scored pairs (an STSData): the
    number deelm selects on (dev scores during training, soups)."""
    emb, where = encode_unique(model, data.sentence1 + data.sentence2, batch_size=batch_size,
                               show_progress_bar=False)
    n = len(data.scores)
    return 100.0 * sts_scores(emb[where[:n]], emb[where[n:]], data.scores)["cosine_spearman"]


def evaluate(model, tasks=None, data_dir=None, protocol="mteb", normalize_punctuation=False,
             batch_size=32, show_progress_bar=True, output_dir=None, model_name=None,
             split="test"):
    """Scores `model` (anything with sentence-transformers' encode) on STS tasks.

    Returns {task: TaskResult}. With output_dir, writes one JSON per task in
    MTEB's result layout and summary.md. split: "test", or "dev" to choose
    settings without touching a test set (STSBenchmark has one; the other
    tasks are test sets only, and asking for their dev split is a DataError).
    tasks: default all seven, or with split="dev" those with a dev split.
    """
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if tasks is None:
        tasks = default_tasks(split)
    if isinstance(tasks, str):
        tasks = [tasks]
    for t in tasks:
        if t not in TASKS:
            raise DataError(f"unknown task {t!r}; known tasks: {', '.join(TASKS)}")
    root = resolve_data_dir(data_dir)
    data = [load_sts_file(task_file(root, t, protocol, split), t) for t in tasks]
    prep = senteval_normalize if (protocol == "senteval" and normalize_punctuation) else (lambda s: s)
    every = [prep(s) for d in data for s in d.sentence1 + d.sentence2]
    t0 = time.perf_counter()
    emb, idx = encode_unique(model, every, batch_size=batch_size, show_progress_bar=show_progress_bar)
    encode_time = time.perf_counter() - t0
    results, at = {}, 0
    for d in data:
        n = len(d.scores)
        i1, i2 = idx[at:at + n], idx[at + n:at + 2 * n]
        at += 2 * n
        pairwise = getattr(model, "similarity_pairwise", None)
        scores = sts_scores(emb[i1], emb[i2], d.scores, pairwise)
        results[d.task] = TaskResult(d.task, protocol, n, scores, d.path,
                                     encode_time * 2 * n / max(len(every), 1), split=split)
    if output_dir is not None:
        write_results(results, output_dir, model_name or repr(model))
    return results


def mteb_result_json(result, model_name):
    """One task's result in the layout of MTEB's result files, readable by
    mteb.results.TaskResult.from_disk. The data is a local file, so
    dataset_revision is the sha256 of its bytes rather than a hub revision."""
    from deelm.saved_model import file_sha256

    scores = dict(result.scores, hf_subset="default", languages=["eng-Latn"])
    return {
        "dataset_revision": file_sha256(result.path) if result.path else "unknown",
        "task_name": result.task,
        "mteb_version": None,
        "evaluated_by": "deelm",
        "model_name": model_name,
        "protocol": result.protocol,
        "data_file": str(result.path),
        "n_pairs": result.n_pairs,
        "scores": {result.split: [scores]},
        "evaluation_time": result.evaluation_time,
        "kg_co2_emissions": None,
    }


def summary_table(results, title=None):
    """Markdown table: tasks as columns, average last, main score x100."""
    tasks = list(results)
    head = "| " + " | ".join(["model"] + tasks + ["avg"]) + " |"
    rule = "|" + "---|" + "---:|" * (len(tasks) + 1)
    vals = [100 * results[t].main_score for t in tasks]
    row = "| " + " | ".join([title or "score"] + [f"{v:.2f}" for v in vals]
                            + [f"{np.mean(vals):.2f}"]) + " |"
    return "\n".join([head, rule, row])


def write_results(results, output_dir, model_name):
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for r in results.values():
        tmp = out / f".{r.task}.json.tmp"
        tmp.write_text(json.dumps(mteb_result_json(r, model_name), indent=2) + "\n")
        tmp.replace(out / f"{r.task}.json")
    (out / "summary.md").write_text(summary_table(results, model_name) + "\n")
