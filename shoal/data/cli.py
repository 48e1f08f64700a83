"""`shoal data prepare` and `shoal data tokenizer`: token shards and the bundled BPE."""

from __future__ import annotations

from pathlib import Path


def cmd_prepare(args) -> int:
    from shoal.data.prepare import parse_size, prepare
    index = prepare(args.sources, args.out, tokenizer=args.tokenizer, field=args.field,
                    shard_size=parse_size(args.shard_size), workers=args.workers, on_bad_record=args.on_bad_record,
                    progress=not args.quiet)
    skipped = f", {index['bad_records']} bad records skipped" if index["bad_records"] else ""
    skipped += f", {index['empty_files']} empty files" if index["empty_files"] else ""
    print(f"{index['total_tokens']:,} tokens ({index['dtype']}, vocabulary {index['vocab_size']}) from "
          f"{index['documents']:,} documents in {len(index['shards'])} shards{skipped}: {Path(args.out) / 'index.json'}")
    return 0


def cmd_tokenizer(args) -> int:
    from shoal.data.tokenizer import train_stdlib_bpe
    path = train_stdlib_bpe(Path(args.out), args.vocab_size)
    print(f"byte-level BPE with {args.vocab_size} ids trained on the standard library's sources: {path}")
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare token shards; train the bundled tokenizer",
                                 description="Turn your text into token shards for data.source = 'shards'.")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    p = sub.add_parser("prepare", help="text/JSONL/Parquet/datasets folders -> token shards + index.json",
                       description="Tokenise SRC files or folders into flat uint16/uint32 shards and index.json. "
                                   "Started again with the same arguments, it resumes.")
    p.add_argument("sources", nargs="+", metavar="SRC", help="text files, .jsonl, .parquet, a datasets.save_to_disk "
                                                             "folder, or folders of them")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the shards and index.json")
    p.add_argument("--tokenizer", default="bytes", help="'bytes' (default), 'bpe' (bundled, 2048 ids), or a local "
                                                        "tokenizer.json / transformers tokenizer folder")
    p.add_argument("--field", default="text", help="the text field of JSONL records or column of tables")
    p.add_argument("--shard-size", default="256MB", help="bytes per shard file, e.g. 256MB")
    p.add_argument("--workers", type=int, default=1, help="processes tokenising in parallel (one unit of files each)")
    p.add_argument("--on-bad-record", choices=("error", "skip"), default="error",
                   help="a JSONL line that is not JSON: stop naming it, or skip and count it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)
    t = sub.add_parser("tokenizer", help="train the bundled byte-level BPE on the standard library (offline)")
    t.add_argument("--out", required=True, metavar="PATH", help="where to write tokenizer.json")
    t.add_argument("--vocab-size", type=int, default=2048, help="ids in the vocabulary")
    t.set_defaults(func=cmd_tokenizer)

