"""Encoder-decoder models (T5) on token data: with model.loss = 'model' the encoder reads each
sample and the decoder learns its next tokens (labels made contiguous for T5's own loss);
the built-in loss is refused in one line naming the fix; `generate` prints the decoder's
output through transformers' own generate, not its start token."""

from __future__ import annotations

import pytest
import torch

from shoal.config import ConfigError, load
from shoal.data import build_dataset
from shoal.models import Loss, build_model, call_model
from tests.conftest import TINY, shoal


def save_t5(folder):
    import transformers as tf
    tf.T5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                architectures=["T5ForConditionalGeneration"]).save_pretrained(folder)
    return folder


def test_t5_learns_the_next_tokens_of_token_data_with_its_own_loss(tmp_path):
    cfg = load(None, [f"model.hf={save_t5(tmp_path / 't5')}", "model.loss=model", "data.seq_len=16",
                      "data.max_bytes=100000"])
    train, _, spec = build_dataset(cfg.data, 0)
    inputs, targets = train.get(torch.arange(4))
    assert not targets.is_contiguous()  # a view of the token windows: T5's labels.view(-1) failed on it
    model = build_model(cfg.model, spec)
    loss = Loss("model")(call_model(model, inputs, targets), inputs, targets)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert model.decoder.block[0].layer[0].SelfAttention.q.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match=r"encoder-decoder.*model.loss = 'model'"):
        call_model(model, inputs)  # the built-in loss has no targets to give the decoder


def test_generate_prints_the_decoders_output(tmp_path, caplog):
    from shoal.export.consolidate import consolidate
    from shoal.export.generate import generate
    from tests.export.conftest import saved_run
    run_dir, _ = saved_run(tmp_path, "t5", [f"model.hf={save_t5(tmp_path / 't5_model')}", "model.loss=model"])
    caplog.clear()
    loaded = consolidate(run_dir, progress=False)
    assert not [r for r in caplog.records if r.name == "shoal"]  # the checkpoint's weights: no word on the folder's
    text = generate(loaded, "def f", 6, temperature=0)
    ids = torch.tensor([list(b"def f")])
    expected = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                                     do_sample=False, pad_token_id=0)[0]
    assert int(expected[0]) == 0  # the decoder's start token (NUL as a byte), not part of the answer
    assert text == bytes(expected[1:].tolist()).decode("utf-8", errors="replace")


@pytest.mark.slow
def test_t5_runs_as_a_user_types_it(tmp_path):
    folder = save_t5(tmp_path / "t5")
    args = [*TINY, "launch.nproc=1", "data.seq_len=16", f"model.hf={folder}", "train.steps=2"]
    ok = shoal("run", *args, "model.loss=model", "log.name=own", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    refused = shoal("run", *args, "log.name=builtin", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    lines = [line for line in refused.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "model.loss = 'model'" in lines[0], refused.stderr
