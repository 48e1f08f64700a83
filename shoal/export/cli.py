"""`shoal export`, `generate`, `predict` and `serve`: a run directory's model put to use."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from shoal.config import ConfigError


def cmd_export(args) -> int:
    from shoal.export.consolidate import consolidate
    from shoal.export.formats import FORMATS, export
    if args.format not in FORMATS:
        raise ConfigError(f"--format {args.format}: choose one of {', '.join(FORMATS)}")
    started = time.perf_counter()
    loaded = consolidate(Path(args.run_dir), args.step)
    out = export(loaded, args.format, Path(args.out))
    print(f"shoal: exported step {loaded.step} of {args.run_dir} as {args.format} to {out} "
          f"({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    from shoal.export.consolidate import consolidate
    from shoal.export.generate import generate
    if args.tokens < 1:
        raise ConfigError(f"--tokens {args.tokens}: must be at least 1")
    if args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature}: must be 0 (greedy) or more")
    loaded = consolidate(Path(args.run_dir), args.step)
    print(generate(loaded, args.prompt, args.tokens, temperature=args.temperature, top_k=args.top_k,
                   seed=args.seed))
    return 0


def cmd_predict(args) -> int:
    from shoal.export.predict import predict
    try:
        index = predict(Path(args.run_dir), args.data, Path(args.out), nproc=args.nproc, step=args.step,
                        batch_size=args.batch_size, part_rows=args.part_rows, threads=args.threads)
    except RuntimeError as err:  # a worker died (its own traceback is above); finished parts are kept
        print(f"shoal: {err}", file=sys.stderr)
        return 1
    print(f"shoal: {index['rows']} rows in {len(index['parts'])} parts; index {Path(args.out) / 'index.json'}",
          file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from shoal.export.serve import serve
    if args.max_batch < 1 or args.max_wait_ms < 0:
        raise ConfigError("--max-batch must be at least 1 and --max-wait-ms at least 0")
    serve(Path(args.run_dir), host=args.host, port=args.port, step=args.step, max_batch=args.max_batch,
          max_wait_ms=args.max_wait_ms)
    return 0


def register(subparsers) -> None:
    export = subparsers.add_parser(
        "export", help="consolidate a run's checkpoint (any layout) into one deployable model",
        description="Rebuild the run's model on one process, load its checkpoint (saved under any layout) and "
                    "write it as safetensors, a Hugging Face folder, a torch.export .pt2 or ONNX.")
    export.add_argument("run_dir", help="a run directory, e.g. runs/quickstart")
    export.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
    export.add_argument("--format", required=True, metavar="FORMAT",
                        help="safetensors | hf | torch-export | onnx")
    export.add_argument("--out", required=True, help="file (or folder, for hf) to write")
    export.set_defaults(func=cmd_export)

    gen = subparsers.add_parser("generate", help="sample text from a run's language model",
                                description="Continue a prompt with the run's gpt or Hugging Face causal LM.")
    gen.add_argument("run_dir", help="a run directory, e.g. runs/quickstart")
    gen.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    gen.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 means all")
    gen.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    gen.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
    gen.set_defaults(func=cmd_generate)

    pred = subparsers.add_parser(
        "predict", help="score a data set with a run's model, in Parquet parts over worker processes",
        description="Score every row of --data with the run's model on --nproc worker processes. Each writes "
                    "its own Parquet part files (id, prediction, score, probabilities); index.json lists them. "
                    "A rerun into the same --out skips the parts already written.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="--data is one of:\n"
               "  DIR            a folder with x.npy (y.npy, if there, is ignored)\n"
               "  FILE.npy       a 2-D float array, one row per sample\n"
               "  FILE.parquet   numeric columns, one per feature (an 'id' column is kept as the id;\n"
               "                 'label'/'y' columns are ignored)\n"
               "  key=value ...  the run's own [data] section with these overrides, every sample\n"
               "                 (e.g. --data source=clicks num_samples=50000)")
    pred.add_argument("run_dir", help="a run directory, e.g. runs/recommendations")
    pred.add_argument("--data", nargs="+", required=True, metavar="SOURCE", help="rows to score (see below)")
    pred.add_argument("--out", required=True, help="folder for the part files and index.json")
    pred.add_argument("--nproc", type=int, default=1, help="worker processes")
    pred.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
    pred.add_argument("--batch-size", type=int, default=1024, help="rows per forward pass")
    pred.add_argument("--part-rows", type=int, default=65536,
                      help="rows per part file (the unit of work a rerun skips)")
    pred.add_argument("--threads", type=int, default=0,
                      help="torch threads per worker (default 0: this host's cores shared among the workers)")
    pred.set_defaults(func=cmd_predict)

    srv = subparsers.add_parser(
        "serve", help="answer HTTP/JSON requests with a run's model (micro-batched)",
        description="One process serving POST /predict {\"rows\": [[...]]} and GET /health; requests that "
                    "arrive together share one forward pass.")
    srv.add_argument("run_dir", help="a run directory")
    srv.add_argument("--port", type=int, default=8080, help="port to listen on (0 picks a free one)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    srv.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
    srv.add_argument("--max-batch", type=int, default=64, help="most rows in one forward pass")
    srv.add_argument("--max-wait-ms", type=float, default=2.0,
                     help="how long the first request of a batch waits for others; 0 batches only what is queued")
    srv.set_defaults(func=cmd_serve)
