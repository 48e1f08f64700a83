"""Token shards: `shoal data prepare` reads back as direct tokenisation; bad input is one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from shoal.config import ConfigError
from shoal.data import ShardedSampler, check_vocab
from shoal.data.prepare import prepare
from shoal.data.shards import TokenShards
from shoal.data.spec import DataSpec
from shoal.data.tokenizer import encode_documents, load_tokenizer
from tests.conftest import shoal

DOCS = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n", "naïve café ünïcode ✓\n",
        "import os\nprint(os.getcwd())\n", "for i in range(10):\n    pass\n"]


@pytest.fixture
def corpus(tmp_path):
    """The same five documents as text files, JSONL, Parquet and a datasets.save_to_disk folder."""
    src = tmp_path / "src"
    (src / "txt").mkdir(parents=True)
    for i, doc in enumerate(DOCS[:2]):
        (src / "txt" / f"{i}.txt").write_text(doc)
    (src / "c.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS[2:4])))
    pq.write_table(pa.table({"body": [DOCS[4]]}), src / "d.parquet")
    import datasets
    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(str(src / "hf"))
    return src


def stream(folder, seq_len=4) -> np.ndarray:
    shards = TokenShards(folder, seq_len)
    return shards.read(0, shards.total)


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_prepared_shards_equal_direct_tokenisation(corpus, tmp_path, tokenizer):
    out = tmp_path / f"shards-{tokenizer}"
    sources = [str(corpus / "txt"), str(corpus / "c.jsonl")]
    prepare(sources, out, tokenizer=tokenizer, shard_size=40, workers=1, progress=False)
    prepare([str(corpus / "d.parquet")], tmp_path / "pq", tokenizer=tokenizer, field="body", progress=False)
    prepare([str(corpus / "hf")], tmp_path / "hf", tokenizer=tokenizer, field="body", progress=False)
    tok = load_tokenizer(tokenizer)
    direct = [t for ids in encode_documents(tok, DOCS) for t in ids]
    cut = sum(len(ids) for ids in encode_documents(tok, DOCS[:4]))
    assert stream(out).tolist() == direct[:cut]
    assert stream(tmp_path / "pq").tolist() == direct[cut:]
    assert stream(tmp_path / "hf").tolist() == direct  # every row of the Arrow folder
    index = json.loads((out / "index.json").read_text())
    assert len(index["shards"]) > 2 and index["dtype"] == "uint16" and index["vocab_size"] == tok.vocab_size
    if tokenizer == "bpe":
        assert len(direct) < sum(len(d.encode()) for d in DOCS) * 0.7  # a real BPE compresses code


@pytest.mark.slow
def test_the_command_in_parallel_gives_the_same_shards_and_resumes(corpus, tmp_path):
    sources = [str(corpus / "txt"), str(corpus / "c.jsonl"), str(corpus / "d.parquet")]
    # d.parquet has no 'text' column: a one-line error naming the file, and the finished units are kept
    out = tmp_path / "parallel"
    failed = shoal("data", "prepare", *sources, "--out", str(out), "--shard-size", "30", "--workers", "2",
                   cwd=tmp_path, timeout=120)
    assert failed.returncode == 2 and "d.parquet: no column 'text' (columns: body)" in failed.stderr
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("u*.bin")}
    assert kept and not (out / "index.json").exists()
    os.remove(corpus / "d.parquet")
    pq.write_table(pa.table({"text": [DOCS[4]]}), corpus / "d.parquet")
    index = prepare(sources, out, shard_size=30, workers=2, progress=False)
    assert index["documents"] == 5
    assert {n: t for n, t in ((p.name, p.stat().st_mtime_ns) for p in out.glob("u*.bin")) if n in kept} == kept
    serial = tmp_path / "serial"
    prepare(sources, serial, shard_size=30, workers=1, progress=False)
    assert [s["sha256"] for s in json.loads((out / "index.json").read_text())["shards"]] == \
        [s["sha256"] for s in json.loads((serial / "index.json").read_text())["shards"]]


def test_sample_order_is_the_same_for_1_2_and_4_workers(corpus, tmp_path):
    prepare([str(corpus / "hf")], tmp_path / "s", field="body", progress=False)
    data = TokenShards(tmp_path / "s", seq_len=4)
    batches = {}
    for world in (1, 2, 4):
        samplers = [ShardedSampler(len(data), 8, seed=7) for _ in range(world)]  # one per rank
        steps = []
        for _ in range(len(data) // 8 * 2):  # two epochs
            rows = [data.get(samplers[rank].next_batch(rank, world))[0] for rank in range(world)]
            steps.append(torch.cat(rows))
        batches[world] = torch.stack(steps)
    assert torch.equal(batches[1], batches[2]) and torch.equal(batches[1], batches[4])


def test_bad_shards_and_inputs_are_one_line_errors(corpus, tmp_path):
    out = tmp_path / "s"
    prepare([str(corpus / "txt"), str(corpus / "c.jsonl")], out, shard_size=30, progress=False)
    TokenShards(out, 4, cache=tmp_path)  # verified and remembered
    first = sorted(out.glob("u*.bin"))[0]
    data = bytearray(first.read_bytes())
    data[0] ^= 1
    first.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=f"shard {first}: checksum does not match"):
        TokenShards(out, 4, cache=tmp_path)
    first.write_bytes(bytes(data[:-2]))
    with pytest.raises(ConfigError, match=f"shard {first} is truncated .* {len(data) - 2} bytes, the index says"):
        TokenShards(out, 4)
    first.unlink()
    with pytest.raises(ConfigError, match=f"shard {first} is missing"):
        TokenShards(out, 4)
    with pytest.raises(ConfigError, match="tokenizer /nowhere/tok.json: no such file or folder"):
        prepare([str(corpus / "txt")], tmp_path / "x", tokenizer="/nowhere/tok.json", progress=False)
    (corpus / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(ConfigError, match=r"empty.jsonl: no documents, or 'text' is empty in every record"):
        prepare([str(corpus / "empty.jsonl")], tmp_path / "e", progress=False)
    (corpus / "blank").mkdir()
    (corpus / "blank" / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match="every file is empty; nothing to tokenise"):
        prepare([str(corpus / "blank")], tmp_path / "e2", progress=False)
    (corpus / "blank" / "words.txt").write_text("some words")  # an empty text file among others is counted
    index = prepare([str(corpus / "blank")], tmp_path / "e3", progress=False)
    assert index["empty_files"] == 1 and index["total_tokens"] == len("some words")
    (corpus / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n{"text": "ok"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: bad record"):
        prepare([str(corpus / "bad.jsonl")], tmp_path / "b", progress=False)
    index = prepare([str(corpus / "bad.jsonl")], tmp_path / "b2", on_bad_record="skip", progress=False)
    assert index["bad_records"] == 1 and index["total_tokens"] == len("fineok")
    with pytest.raises(ConfigError, match="the tokenizer has 2048 ids but the model's embedding holds 256"):
        check_vocab(DataSpec(kind="tokens", vocab_size=2048, seq_len=8), 256, "data.path")


@pytest.mark.slow
def test_resident_memory_does_not_grow_with_the_shard_set(tmp_path):
    """A worker reading windows from 1 MB and from 100 MB of shards holds about the same memory."""
    from shoal.data.prepare import ShardWriter, write_index
    chunk = np.random.default_rng(0).integers(0, 256, 4_000_000, dtype=np.uint16)
    for name, tokens in (("small", 500_000), ("large", 50_000_000)):
        folder = tmp_path / name
        folder.mkdir()
        writer = ShardWriter(folder, "u00000", 16_000_000, "uint16")
        for start in range(0, tokens, 4_000_000):
            writer.write(chunk[:tokens - start])
        write_index(folder, writer.finish(), {"name": "bytes", "vocab_size": 256, "eos": None})
    reader = (
        "import sys, torch\n"
        "from shoal.data import ShardedSampler\n"
        "from shoal.data.shards import TokenShards\n"
        "data = TokenShards(sys.argv[1], 256)\n"
        "sampler = ShardedSampler(len(data), 64, seed=0)\n"
        "for _ in range(200):\n"
        "    x, y = data.get(sampler.next_batch(0, 1))\n"
        "print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')][0])\n")
    rss = {name: int(subprocess.run([sys.executable, "-c", reader, str(tmp_path / name)], check=True,
                                    capture_output=True, text=True, cwd=tmp_path).stdout) for name in ("small", "large")}
    assert rss["large"] - rss["small"] < 50 * 1024, rss  # kB
