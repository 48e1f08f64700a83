"""The Python API: a script calls shoal.train with its own functions (model, data, loss),
the workers import them from the script by name, and the run directory and final metrics
come back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.api import _name_of
from shoal.config import ConfigError

SCRIPT = '''
import glob, json, sys, time
import torch, transformers
import torch.nn.functional as F
from torch.utils.data import Dataset
import shoal

class Tokens(Dataset):
    vocab_size = 256
    def __len__(self):
        return 64
    def __getitem__(self, i):
        window = (torch.arange(17) * (i + 1)) % 256
        return window[:-1], window[1:]

def build_model(spec):
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=256, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)

def my_loss(output, batch):
    return F.cross_entropy(output.logits.flatten(0, 1), batch["targets"].flatten())

if __name__ == "__main__":
    config = shoal.Config()
    config.train.steps, config.train.batch_size, config.train.eval_every = 3, 4, 3
    config.launch.threads, config.parallel.dp_shard = 1, 2
    result = shoal.train(config, model=build_model, data=Tokens, loss=my_loss, overrides=["log.dir=" + sys.argv[1]],
                         ray=sys.argv[2:] == ["ray"])
    # Under torchrun this process trained in place: its Gloo groups and their threads must be gone
    # now, not left for the interpreter's exit (which they can abort). A thread's task can outlive
    # its join by a moment.
    def gloo_threads():
        return sum(open(p).read().startswith(("gloo", "pt_gloo")) for p in glob.glob("/proc/self/task/*/comm"))
    deadline = time.monotonic() + 30
    while gloo_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    print(json.dumps({"run_dir": str(result.run_dir), "metrics": result.metrics, "gloo_threads": gloo_threads()}))
'''


@pytest.mark.slow
@pytest.mark.timeout(1500)  # a hang guard: Ray starting on a loaded 2-core machine took minutes (test_ray.py)
@pytest.mark.parametrize("started_by", ["python", "torchrun", pytest.param("ray", marks=pytest.mark.machine)])
def test_a_script_trains_through_the_api(tmp_path, started_by):
    """`python script.py`: shoal starts 2 workers. `torchrun script.py`: each process is a worker
    and trains in place. `ray=True`: 2 Ray Train workers on a Ray started for the run, which
    import the script's functions by name as the others do."""
    if started_by == "ray":
        pytest.importorskip("ray.train.torch")
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    command = [sys.executable, str(script)] if started_by != "torchrun" else \
        [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", str(script)]
    out = subprocess.run([*command, str(tmp_path / "runs"), *(["ray"] if started_by == "ray" else [])],
                         cwd=tmp_path, capture_output=True,
                         text=True, timeout=1400, stdin=subprocess.DEVNULL, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    # Under torchrun every rank prints its result into one pipe, where two lines can run together.
    decoder = json.JSONDecoder()
    results = [decoder.raw_decode(out.stdout, m.start())[0] for m in re.finditer(r'\{"run_dir"', out.stdout)]
    assert len(results) == (2 if started_by == "torchrun" else 1), out.stdout[-3000:]
    run_dir = tmp_path / "runs" / "shoal"
    for result in results:
        assert result["run_dir"] == str(run_dir) and (run_dir / "metrics.jsonl").is_file()
        assert result["gloo_threads"] == 0
        assert result["metrics"]["step"] == 3 and result["metrics"]["loss"] > 0 and "val_loss" in result["metrics"]
    assert (run_dir / "ray").is_dir() == (started_by == "ray")  # Ray Train's own records of the run
    saved = (run_dir / "config.toml").read_text()  # the workers were given names, not objects
    assert 'factory = "user_script:build_model"' in saved and 'loss = "user_script:my_loss"' in saved


def test_functions_reach_workers_by_name_only():
    assert _name_of(json.dumps, "model") == "json:dumps"
    assert _name_of("pkg.mod:fn", "loss") == "pkg.mod:fn"
    with pytest.raises(ConfigError, match="not a module-level function"):
        _name_of(lambda spec: None, "model")
    with pytest.raises(ConfigError, match="takes a module-level function"):
        _name_of(object(), "model")
