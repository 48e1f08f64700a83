"""Samples of different lengths: without data.collate one line names it (not torch's "stack
expects each tensor to be equal size" traceback); with it, or shoal.train(collate=...), they
train."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import Dataset

from shoal.config import ConfigError
from shoal.data.factory import from_torch_dataset


class Ragged(Dataset):
    """Token windows of 4 to 11 tokens: the length of a sentence, not of a fixed window."""

    vocab_size = 256

    def __len__(self):
        return 32

    def __getitem__(self, i):
        window = (torch.arange(5 + i % 8) * (i + 1)) % 256
        return window[:-1], window[1:]


def pad(items):
    """Right-pad inputs with 0 and targets with -100 (cross-entropy's ignore index)."""
    longest = max(len(x) for x, _ in items)
    inputs = torch.zeros(len(items), longest, dtype=torch.long)
    targets = torch.full((len(items), longest), -100, dtype=torch.long)
    for row, (x, y) in enumerate(items):
        inputs[row, :len(x)], targets[row, :len(y)] = x, y
    return inputs, targets


def test_ragged_samples_without_collate_are_one_line_naming_it():
    train, _, _ = from_torch_dataset(Ragged(), val_fraction=0.0)
    with pytest.raises(ConfigError) as err:
        train.get(torch.arange(4))
    message = str(err.value)
    assert "\n" not in message and "data.collate" in message and "differ in size" in message
    inputs, targets = from_torch_dataset(Ragged(), collate=pad, val_fraction=0.0)[0].get(torch.arange(4))
    assert inputs.shape == targets.shape == (4, 7)


SCRIPT = '''
import json, sys
import transformers
import shoal
from tests.data.test_collate import Ragged, pad

def build_model(spec):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=256,
                                                                n_positions=32, bos_token_id=0, eos_token_id=0))

if __name__ == "__main__":
    config = shoal.Config()
    config.train.steps, config.train.batch_size, config.train.eval_every = 2, 4, 0
    config.launch.nproc, config.launch.threads = 1, 1
    try:
        result = shoal.train(config, model=build_model, data=Ragged, collate=pad if sys.argv[2] == "pad" else None,
                             overrides=["log.dir=" + sys.argv[1], "log.name=" + sys.argv[2]])
        print(json.dumps(result.metrics))
    except shoal.ConfigError as err:
        print("refused:", err)
'''


@pytest.mark.slow
def test_shoal_train_takes_collate(tmp_path):
    script = tmp_path / "ragged_script.py"
    script.write_text(SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    runs = {}
    for mode in ("pad", "none"):
        runs[mode] = subprocess.run([sys.executable, str(script), str(tmp_path / "runs"), mode], cwd=tmp_path,
                                    capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert runs["pad"].returncode == 0, runs["pad"].stderr[-3000:]
    metrics = json.loads(runs["pad"].stdout.strip().splitlines()[-1])
    assert metrics["step"] == 2 and metrics["loss"] > 0
    saved = (tmp_path / "runs" / "pad" / "config.toml").read_text()
    assert 'collate = "tests.data.test_collate:pad"' in saved
    assert "refused:" in runs["none"].stdout, runs["none"].stdout + runs["none"].stderr[-3000:]
    said = runs["none"].stderr + "".join(p.read_text() for p in (tmp_path / "runs" / "none" / "logs").rglob("*.log"))
    errors = [line for line in said.splitlines() if line.startswith("shoal: error:")]
    assert len(set(errors)) == 1 and "data.collate" in errors[0], said[-3000:]  # the launcher echoes it
    assert "stack expects" not in said.replace(errors[0], "") and "Traceback" not in said, said[-3000:]
