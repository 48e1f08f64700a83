"""data.source = 'arrow' / 'parquet': token-id, text and feature tables, read by row."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from shoal.config import ConfigError, DataConfig
from shoal.data import build_dataset
from shoal.data.tokenizer import encode_documents, load_tokenizer

TEXTS = ["import os\n" * 3, "def f(x):\n    return x * 2\n", "", "class A:\n    pass\n" * 4]


def test_token_id_column_from_a_datasets_folder_is_windowed_as_one_stream(tmp_path):
    import datasets
    rows = [list(range(i * 10, i * 10 + 7)) for i in range(30)]
    datasets.Dataset.from_dict({"input_ids": rows}).save_to_disk(str(tmp_path / "hf"))
    train, val, spec = build_dataset(DataConfig(source="arrow", path=str(tmp_path / "hf"), seq_len=5,
                                                val_fraction=0.1))
    stream = torch.tensor([t for r in rows for t in r])
    assert (spec.kind, spec.vocab_size, spec.seq_len) == ("tokens", 297, 5)
    assert len(train) + len(val) == (len(stream) - 1) // 5
    x, y = train.get(torch.tensor([0, 3]))
    assert torch.equal(x[1], stream[15:20]) and torch.equal(y[1], stream[16:21])


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_text_column_is_tokenised_per_row_with_ignored_padding(tmp_path, fmt):
    table = pa.table({"text": TEXTS * 4})
    if fmt == "parquet":
        pq.write_table(table, tmp_path / "t.parquet", row_group_size=5)
    else:
        with pa.ipc.new_file(str(tmp_path / "t.arrow"), table.schema) as writer:
            writer.write_table(table)
    train, _, spec = build_dataset(DataConfig(source=fmt, path=str(tmp_path / f"t.{fmt}"), seq_len=8, tokenizer="bpe",
                                              val_fraction=0.0))
    assert spec.vocab_size == 2048 and len(train) == 16
    x, y = train.get(torch.tensor([5, 13, 2]))  # rows in two row groups, one empty text
    tok = load_tokenizer("bpe")
    short = encode_documents(tok, ["import os\n"])[0]
    assert len(short) < 9
    long = encode_documents(tok, [TEXTS[1]])[0]
    assert len(long) > 9 and x[0].tolist() == long[:8] and y[0].tolist() == long[1:9]  # cut to seq_len + 1
    assert (y[2] == -100).all()  # an empty text: nothing to learn
    pq.write_table(pa.table({"text": ["import os\n"] * 3}), tmp_path / "short.parquet")
    train, _, _ = build_dataset(DataConfig(source="parquet", path=str(tmp_path / "short.parquet"), seq_len=8,
                                           tokenizer="bpe", val_fraction=0.0))
    x, y = train.get(torch.tensor([1]))
    n = len(short)
    assert x[0, :n - 1].tolist() == short[:-1] and y[0, :n - 1].tolist() == short[1:] and (y[0, n - 1:] == -100).all()


def test_feature_columns_and_a_label(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=100), rng.normal(size=100)
    pq.write_table(pa.table({"a": a, "b": b, "name": ["x"] * 100, "y": (a > b).astype(np.int64)}),
                   tmp_path / "f.parquet", row_group_size=32)
    train, _, spec = build_dataset(DataConfig(source="parquet", path=str(tmp_path), label="y", val_fraction=0.0))
    assert (spec.kind, spec.in_features, spec.num_classes) == ("classes", 2, 2)
    x, y = train.get(torch.tensor([99, 0, 40]))
    assert torch.allclose(x, torch.tensor(np.stack([a, b], 1)[[99, 0, 40]], dtype=torch.float32))
    assert y.tolist() == [int(a[i] > b[i]) for i in (99, 0, 40)]


def test_table_errors_name_the_file_and_column(tmp_path):
    pq.write_table(pa.table({"text": ["", None, ""]}), tmp_path / "empty.parquet")
    with pytest.raises(ConfigError, match="empty.parquet: the text column 'text' is empty"):
        build_dataset(DataConfig(source="parquet", path=str(tmp_path / "empty.parquet")))
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "other.parquet")
    with pytest.raises(ConfigError, match="other.parquet: none of the columns input_ids, tokens, text"):
        build_dataset(DataConfig(source="parquet", path=str(tmp_path / "other.parquet")))
    with pytest.raises(ConfigError, match="other.parquet: no column 'y' \\(columns: body\\)"):
        build_dataset(DataConfig(source="parquet", path=str(tmp_path / "other.parquet"), label="y"))
    with pytest.raises(ConfigError, match="tokenizer missing/tok.json: no such file"):
        build_dataset(DataConfig(source="parquet", path=str(tmp_path / "other.parquet"), columns="body",
                                 tokenizer="missing/tok.json"))


def test_a_transformers_tokenizer_folder_works_offline(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from shoal.data.tokenizer import BUNDLED_BPE
    PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_BPE), eos_token="<|endoftext|>").save_pretrained(tmp_path / "tok")
    folder, bundled = load_tokenizer(str(tmp_path / "tok")), load_tokenizer("bpe")
    assert (folder.vocab_size, folder.eos) == (bundled.vocab_size, bundled.eos)
    assert folder.encode_batch(TEXTS) == bundled.encode_batch(TEXTS)
    with pytest.raises(ConfigError, match="tokenizer gpt2: no such file or folder"):
        load_tokenizer("gpt2")  # a hub name is never downloaded
