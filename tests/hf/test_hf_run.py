"""Hugging Face models through `shoal run` as a user types it: a saved folder trains under
FSDP and resumes exactly; each bad input is one line, exit code 2, before any worker starts
where the config alone tells (a custom loss through real workers: tests/hf/test_api.py)."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from tests.conftest import TINY, shoal, train_losses
from tests.hf.tiny import save_tiny

# 16-token windows of bytes, a tiny model, constant learning rate (so a resumed run's
# schedule does not depend on where it stopped)
HF = [*TINY, "data.seq_len=16", "train.min_lr_ratio=1.0", "train.warmup_steps=0"]


@pytest.mark.slow
def test_llama_fsdp_resumes_exactly_and_saves_its_own_keys(tmp_path):
    folder = save_tiny("llama", tmp_path / "llama", weights=True)  # weights from model.safetensors
    args = [*HF, f"model.hf={folder}", "parallel.dp_shard=2", "parallel.shard_modules=LlamaDecoderLayer",
            "train.steps=4", "checkpoint.every=2", "checkpoint.keep=0"]
    first = shoal("run", *args, "log.name=llama", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "runs" / "llama"
    expected = train_losses(run)
    assert sorted(expected) == [1, 2, 3, 4]
    # drop the last checkpoint: --resume continues from step 2 and must repeat steps 3-4
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "metrics.jsonl").unlink()
    resumed = shoal("run", *args, "log.name=llama", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    again = train_losses(run)
    assert sorted(again) == [3, 4]
    assert all(again[s] == expected[s] for s in again), (again, expected)
    # the checkpoint's model keys are the PreTrainedModel's own (save_pretrained works on them)
    import transformers
    from torch.distributed.checkpoint import FileSystemReader
    meta = FileSystemReader(str(run / "checkpoints" / "step_00000004")).read_metadata()
    model_keys = {k.split(".", 1)[1] for k in meta.state_dict_metadata if k.startswith("model.")}
    own = set(transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(folder)).state_dict())
    assert own == model_keys, own ^ model_keys


@pytest.mark.parametrize("case, message", [
    ("no_config", "no config.json in that folder"),
    ("unknown_arch", "architecture 'NopeForCausalLM' is not in the installed transformers"),
    ("shard_modules", "parallel.shard_modules: GPT2Blokc not in GPT2LMHeadModel (did you mean GPT2Block?); "
                      "its classes: "
                      "GPT2Block, GPT2Attention, GPT2MLP, GPT2Model, Conv1D"),
    ("tp_no_plan", "parallel.tp = 2: model.hf = "),
    ("tp_heads", "parallel.tp = 3 must divide the model's num_attention_heads = 4"),
])
def test_bad_hf_input_is_refused_before_workers_start(tmp_path, monkeypatch, capsys, case, message):
    """`shoal run` (its main, in this process: no worker may start) prints one line, returns 2."""
    from shoal import cli
    folder = save_tiny({"tp_no_plan": "bert", "tp_heads": "llama"}.get(case, "gpt2"), tmp_path / "m")
    extra = {"no_config": [f"model.hf={tmp_path}"],
             "unknown_arch": [f"model.hf={folder}"],
             "shard_modules": [f"model.hf={folder}", "parallel.dp_shard=2", "parallel.shard_modules=GPT2Blokc"],
             "tp_no_plan": [f"model.hf={folder}", "parallel.tp=2"],
             "tp_heads": [f"model.hf={folder}", "parallel.tp=3", "launch.nproc=3", "train.batch_size=9"],
             }[case]
    if case == "unknown_arch":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "architectures": ["NopeForCausalLM"]}))
    monkeypatch.chdir(tmp_path)
    code = cli.main(["run", *HF, "train.steps=2", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shoal: error:") and message in lines[0], err
    assert not (tmp_path / "runs").exists()  # refused before a run directory (or a worker) existed


@pytest.mark.slow
@pytest.mark.parametrize("layout", [[], ["parallel.pp=2"]])  # under PP the last stage computes the loss
def test_a_loss_that_is_not_a_scalar_stops_the_workers_with_one_line(tmp_path, layout):
    folder = save_tiny("gpt2", tmp_path / "m")
    (tmp_path / "badloss.py").write_text("def per_token(output, batch):\n"  # a pipeline's last stage gives the logits
                                            "    return getattr(output, 'logits', output).mean(-1)\n")
    out = shoal("run", *HF, "train.steps=2", f"model.hf={folder}", "model.loss=badloss:per_token", *layout,
                cwd=tmp_path,
                timeout=120, env={"PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    # the shape is that of a micro-batch: a pipeline splits the batch further
    assert len(lines) == 1 and re.search(r"model.loss = 'badloss:per_token' returned \(\d, 16\), not a scalar "
                                         r"tensor", lines[0]), out.stderr


@pytest.mark.slow
def test_vit_classifies_an_image_folder_under_ddp(tmp_path):
    """ViT for image classification on `data.source = "images"` (class folders of PNGs)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for label in range(4):
        (tmp_path / "images" / f"class{label}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                tmp_path / "images" / f"class{label}" / f"{i}.png")
    folder = save_tiny("vit", tmp_path / "vit")  # image_size 16, 4 labels
    out = shoal("run", *TINY, f"model.hf={folder}", "data.source=images", f"data.path={tmp_path / 'images'}",
                "data.image_size=16", "train.steps=3", "parallel.dp_replicate=2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert sorted(train_losses(tmp_path / "runs" / "quickstart")) == [1, 2, 3]
