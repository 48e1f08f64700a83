"""`shoal predict` and `shoal serve` for Hugging Face classifiers, whose output is a ModelOutput
holding `logits`: an image classifier (ResNet) and a sequence classifier reading token ids
(DeBERTa-v2); a language model's per-position logits are still sent to `shoal generate`."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from shoal.export.consolidate import consolidate
from shoal.export.predict import predict
from shoal.export.serve import make_server
from tests.data.test_images import make_data
from tests.export.conftest import one_line_error, saved_run, shoal_here


def _folder(config, folder):
    config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    import transformers as tf
    root = tmp_path_factory.mktemp("predict_hf")
    make_data(root / "shapes", 2)  # 4 classes of 20x20 images
    resnet = _folder(tf.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                     layer_type="basic", num_labels=4,
                                     architectures=["ResNetForImageClassification"]), root / "hf_resnet")
    deberta = _folder(tf.DebertaV2Config(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=64, num_labels=3,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                         architectures=["DebertaV2ForSequenceClassification"]), root / "hf_deberta")
    gpt2 = _folder(tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0,
                                 architectures=["GPT2LMHeadModel"]), root / "hf_gpt2")
    images = ["data.source=images", f"data.path={root / 'shapes'}", "data.image_size=16"]
    return {"resnet": (saved_run(root, "resnet", [f"model.hf={resnet}", *images])[0], images),
            "deberta": saved_run(root, "deberta", [f"model.hf={deberta}"])[0],
            "gpt2": saved_run(root, "gpt2", [f"model.hf={gpt2}"])[0], "root": root}


def _expected(run_dir, x: torch.Tensor) -> torch.Tensor:
    model = consolidate(run_dir).model
    with torch.no_grad():
        return model(x).logits.softmax(-1)


def test_an_image_classifier_is_scored(hf_runs, tmp_path):
    run_dir, images = hf_runs["resnet"]
    index = predict(run_dir, images, tmp_path / "out", batch_size=3)
    table = pq.read_table(tmp_path / "out" / index["parts"][0]["file"])
    assert table.num_rows == index["rows"] == 8
    from shoal.export.rows import open_rows
    _, x = open_rows(images, consolidate(run_dir).cfg).read(0, 8)
    expected = _expected(run_dir, x)
    got = torch.tensor(np.stack(table.column("probabilities").to_numpy(zero_copy_only=False)))
    assert torch.allclose(got, expected, atol=1e-5)
    assert table.column("prediction").to_pylist() == expected.argmax(-1).tolist()


def test_a_sequence_classifier_is_scored_and_served(hf_runs, tmp_path):
    run_dir = hf_runs["deberta"]
    ids = np.random.default_rng(0).integers(0, 256, (10, 32))
    np.save(tmp_path / "ids.npy", ids.astype(np.int64))
    index = predict(run_dir, [str(tmp_path / "ids.npy")], tmp_path / "out", batch_size=4)
    table = pq.read_table(tmp_path / "out" / index["parts"][0]["file"])
    expected = _expected(run_dir, torch.from_numpy(ids))
    assert table.column("prediction").to_pylist() == expected.argmax(-1).tolist()
    server, batcher = make_server(consolidate(run_dir), "127.0.0.1", 0)
    import threading
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        body = json.dumps({"rows": ids[:2].tolist()}).encode()
        url = f"http://127.0.0.1:{server.server_address[1]}/predict"
        with urllib.request.urlopen(urllib.request.Request(url, body), timeout=30) as reply:
            answer = json.loads(reply.read())
    finally:
        server.shutdown()
        server.server_close()
        batcher.stop()
    assert torch.allclose(torch.tensor(answer["probabilities"]), expected[:2], atol=1e-5)


def test_a_language_model_is_still_sent_to_generate(hf_runs, tmp_path, capfd):
    np.save(tmp_path / "ids.npy", np.zeros((4, 32), dtype=np.int64))
    one_line_error(shoal_here(capfd, "predict", str(hf_runs["gpt2"]), "--data", str(tmp_path / "ids.npy"), "--out",
                              str(tmp_path / "out")), "shoal generate")
