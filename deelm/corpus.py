"""Embedding a corpus file into a folder of Parquet shards that a killed run resumes.

Records are read as a stream (plain text, JSONL, CSV, TSV or Parquet), embedded
`shard_size` at a time and written as ``part-000000.parquet``, ... with two
columns, ``id`` and ``embedding`` (a fixed-size list of float32). A shard is
written to a hidden temporary file and renamed into place, so a shard that
exists is complete; a restarted run skips the rows of the shards it finds.
``_deelm_manifest.json`` records what the folder was made from (input,
fields, shard size, model and settings) and refuses a resume with other ones.
Readers that ignore names starting with "_" or "." (pyarrow, pandas, Spark,
Ray, DuckDB's globs of *.parquet) read the folder as one table.
"""
import json
import os
from itertools import islice
from pathlib import Path

import numpy as np

# Suffixes read as records with fields (deelm.eval.sts's reader, Parquet
# streamed here); any other file, and stdin, is plain text.
FIELD_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
MANIFEST = "_deelm_manifest.json"
DEFAULT_SHARD_SIZE = 10_000


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 - makes pyarrow.parquet an attribute
    except ImportError:
        raise ImportError("Parquet needs pyarrow: pip install 'deelm[parquet]'") from None
    return pyarrow


def has_fields(path):
    """Whether the input is read as records with fields (by its suffix)."""
    return path != "-" and Path(path).suffix.lower() in FIELD_SUFFIXES


def count_records(path):
    """How many records the input holds, when that is cheap to know (a
    Parquet footer, or newlines of a text or JSONL file); else None."""
    suffix = Path(path).suffix.lower()
    if path == "-" or suffix in (".csv", ".tsv"):
        return None
    if suffix == ".parquet":
        return _pyarrow().parquet.ParquetFile(path).metadata.num_rows
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")  # a last line without its newline


def read_records(path, text_field="text", id_field=None):
    """(id, text) pairs of the input, streamed. Without `id_field` the id is
    the record's 0-based position. Plain text (stdin, or a file without one
    of FIELD_SUFFIXES) is one record per line, its line number the id; JSONL
    skips blank lines."""
    if not has_fields(path):
        if id_field is not None:
            raise ValueError("plain text has no fields: --id-field needs a .jsonl, .csv, .tsv or "
                             ".parquet file")
        return _text_records(path)
    if Path(path).suffix.lower() == ".parquet":
        return _parquet_records(path, text_field, id_field)
    from deelm.eval.sts import _rows  # JSONL / CSV / TSV, errors naming the file and line

    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return _fields(_rows(Path(path)), path, text_field, id_field)


def _text_records(path):
    import sys

    # bytes decoded line by line, so a decoding error names its line
    with sys.stdin.buffer if path == "-" else open(path, "rb") as f:
        for i, raw in enumerate(f):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{'stdin' if path == '-' else path}, line {i + 1}: not UTF-8 "
                                 f"text ({e.reason})") from None
            yield i, line.rstrip("\r\n")


def _fields(rows, path, text_field, id_field):
    for i, (line, row) in enumerate(rows):
        text = _field(row, text_field, path, line)
        if not isinstance(text, str):
            raise ValueError(f"{path}, line {line}: field {text_field!r} is "
                             f"{type(text).__name__}, not text")
        yield (i if id_field is None else _field(row, id_field, path, line)), text


def _field(row, name, path, line):
    try:
        return row[name]
    except KeyError:
        raise ValueError(f"{path}, line {line}: no field {name!r} (it has "
                         f"{', '.join(map(repr, row)) or 'none'})") from None


def _parquet_records(path, text_field, id_field):
    pa = _pyarrow()
    try:
        f = pa.parquet.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    schema = f.schema_arrow
    for c in [text_field] + ([id_field] if id_field is not None else []):
        if c not in schema.names:
            raise ValueError(f"{path}: no column {c!r} (it has {', '.join(map(repr, schema.names))})")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: column {text_field!r} is {kind}, not text")
    columns = [text_field] + ([id_field] if id_field not in (None, text_field) else [])
    start = 0
    for batch in f.iter_batches(batch_size=4096, columns=columns):
        texts = batch.column(text_field).to_pylist()
        ids = (batch.column(id_field).to_pylist() if id_field is not None
               else range(start, start + len(texts)))
        for i, (row_id, text) in enumerate(zip(ids, texts)):
            if text is None:
                raise ValueError(f"{path}, row {start + i}: column {text_field!r} is null")
            yield row_id, text
        start += len(texts)


def _atomic_write(target, write):
    """write(temporary path), flushed to disk, then renamed to target: after a
    kill, target is either absent or complete."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_json(path, obj):
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + "\n"))


def shard_name(index):
    return f"part-{index:06d}.parquet"


def _write_shard(path, ids, embeddings):
    pa = _pyarrow()
    try:
        id_column = pa.array(ids)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"the ids of {path.name} cannot form one column ({e})") from None
    flat = pa.array(embeddings.reshape(-1), type=pa.float32())
    table = pa.table({"id": id_column,
                      "embedding": pa.FixedSizeListArray.from_arrays(flat, embeddings.shape[1])})
    _atomic_write(path, lambda tmp: pa.parquet.write_table(table, tmp))


def input_identity(path):
    """What tells one input from another for a resume: its path and, for a
    file, its size and modification time (stdin: only its name)."""
    if path == "-":
        return {"input": "-"}
    st = os.stat(path)
    return {"input": str(Path(path).resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def embed_to_shards(model, records, output, source, *, shard_size=DEFAULT_SHARD_SIZE,
                    batch_size=32, normalize_embeddings=False, total=None,
                    show_progress_bar=True):
    """Embeds (id, text) records into Parquet shards in the folder `output`,
    resuming a run that stopped. `source` (a JSON-able dict, such as
    input_identity gives) identifies the input; it, the model's settings,
    the shard size and normalisation must match the folder's manifest.
    Returns a dict: rows, shards, written (shards this call wrote), kept
    (shards found from an earlier run)."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    _pyarrow()
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    options = {k: v for k, v in model.load_options.items() if k != "threads"}
    run = {"input": source, "model": options, "shard_size": shard_size,
           "normalize_embeddings": bool(normalize_embeddings),
           "dim": model.get_sentence_embedding_dimension()}
    manifest_path = out / MANIFEST
    # a folder without shards holds nothing to keep, whatever its manifest says
    if out.is_dir() and any(out.glob("part-*.parquet")):
        if not manifest_path.is_file():
            raise ValueError(f"{out} holds shards but no {MANIFEST}; use a new folder")
        try:
            earlier = json.loads(manifest_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{manifest_path}: not a readable manifest ({e})") from None
        differ = sorted(k for k in run if earlier.get(k) != run[k])
        if differ:
            raise ValueError(f"{out} holds shards of another run (different "
                             f"{', '.join(differ)}); use a new folder or remove it")
        if earlier.get("complete"):
            shards = earlier.get("shards", 0)
            return {"rows": earlier.get("rows", 0), "shards": shards, "written": 0,
                    "kept": shards}
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".part-*.tmp-*"):  # left by a killed run
        stale.unlink()
    _write_json(manifest_path, dict(run, complete=False))

    from tqdm.auto import tqdm

    records = iter(records)
    rows = written = kept = index = 0
    with tqdm(total=total, desc="embed", unit="rec", disable=not show_progress_bar,
              mininterval=1.0) as bar:
        while chunk := list(islice(records, shard_size)):
            path = out / shard_name(index)
            if path.is_file():
                kept += 1  # written by an earlier run: skip its rows
                bar.update(len(chunk))
            else:
                ids = [r[0] for r in chunk]
                batches = []
                for emb in model.encode_iter((r[1] for r in chunk), batch_size=batch_size,
                                             normalize_embeddings=normalize_embeddings):
                    batches.append(emb)
                    bar.update(len(emb))
                _write_shard(path, ids, np.concatenate(batches))
                written += 1
                bar.set_postfix_str(path.name, refresh=False)
            rows += len(chunk)
            index += 1
    _write_json(manifest_path, dict(run, complete=True, rows=rows, shards=index))
    return {"rows": rows, "shards": index, "written": written, "kept": kept}
