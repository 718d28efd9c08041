"""mteb tasks on local files, for mteb runs without the Hugging Face hub.

mteb.get_task(name) describes a task; its data normally comes from the hub
when the task runs. Here the data is read from local files first and handed
to the task, so mteb.evaluate never looks for it elsewhere::

    import mteb, deelm
    from deelm.eval import mteb_tasks

    model = deelm.MTEBModel(deelm.DeeLM.from_pretrained())
    tasks = mteb_tasks.sts_tasks(["STSBenchmark", "SICK-R"])     # ../shared/data/sts
    mteb.evaluate(model, tasks, cache=mteb.ResultCache("results/mteb"))

- sts_tasks / sts_task: the seven STS tasks from deelm's data layout
  (<data>/sts/<Task>/test.jsonl, the folder `deelm eval` reads; see
  deelm.eval.sts.resolve_data_dir).
- local_task(name, folder): any task whose splits are flat tables (STS,
  classification, pair classification, ...): <folder>/<split>.jsonl per split
  the task needs (its eval splits, and "train" for classification), with the
  columns mteb's task reads (text/label, sentence1/sentence2/score, ...).
- with_rows(task, {split: rows}): the same from rows in memory.

Retrieval tasks keep corpus, queries and relevance judgements apart; mteb
reads those from a local folder through its own loader, not through here.
mteb and datasets are needed (pip install "mteb>=2,<3"); deelm imports this
module only when asked.
"""
from pathlib import Path

from deelm.eval.sts import TASKS, DataError, _rows, load_task

SUBSET = "default"


def _get_task(task):
    import mteb

    return mteb.get_task(task) if isinstance(task, str) else task


def with_rows(task, splits, subset=SUBSET):
    """The mteb task (or its name) with its data set to `splits`
    ({split: list of row dicts}), marked as loaded."""
    from datasets import Dataset, DatasetDict

    task = _get_task(task)
    data = {}
    for split, rows in splits.items():
        rows = list(rows)
        if not rows:
            raise DataError(f"{task.metadata.name}: split {split!r} has no rows")
        columns = list(rows[0])
        data[split] = Dataset.from_dict({c: [r[c] for r in rows] for c in columns})
    task.dataset = {subset: DatasetDict(data)}
    task.data_loaded = True
    return task


def needed_splits(task):
    """The splits mteb reads for a task: its eval splits, and the training
    split of classification-like tasks."""
    splits = list(task.metadata.eval_splits)
    train = getattr(task, "train_split", None)
    if train and train not in splits:
        splits.append(train)
    return splits


def local_task(task, folder, splits=None):
    """The mteb task (or its name) with each split read from
    <folder>/<split>.{jsonl,csv,tsv,parquet}."""
    task = _get_task(task)
    folder = Path(folder)
    rows = {}
    for split in splits or needed_splits(task):
        found = [folder / f"{split}{ext}" for ext in (".jsonl", ".json", ".csv", ".tsv", ".parquet")
                 if (folder / f"{split}{ext}").is_file()]
        if not found:
            raise DataError(f"{task.metadata.name}: no {split}.jsonl (or .csv/.tsv/.parquet) in "
                            f"{folder}")
        rows[split] = [r for _, r in _rows(found[0])]
    return with_rows(task, rows)


def sts_task(name, data_dir=None, protocol="mteb"):
    """The mteb STS task `name` with the test pairs deelm's harness reads."""
    data = load_task(name, data_dir, protocol)
    rows = [{"sentence1": a, "sentence2": b, "score": float(s)}
            for a, b, s in zip(data.sentence1, data.sentence2, data.scores)]
    return with_rows(name, {"test": rows})


def sts_tasks(names=TASKS, data_dir=None, protocol="mteb"):
    """sts_task for each name (default: all seven)."""
    return [sts_task(n, data_dir, protocol) for n in names]
