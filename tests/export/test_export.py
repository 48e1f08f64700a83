"""`shoal export`: a checkpoint saved under DDP, FSDP, TP or PP becomes one model whose every
exported format computes what the model computes; bad requests end in one line and write nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from shoal.export.consolidate import build, consolidate, example_inputs
from shoal.export.formats import export
from tests.conftest import SHOAL, TINY, shoal
from tests.export.conftest import one_line_error, saved_run, shoal_here

LAYOUTS = {
    "ddp": [],
    "fsdp": ["parallel.dp_replicate=1", "parallel.dp_shard=2"],
    "tp": ["parallel.dp_replicate=1", "parallel.tp=2"],
    "pp": ["parallel.dp_replicate=1", "parallel.pp=2"],
}
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory) -> dict[str, Path]:
    """One 2-step, 2-worker run of the tiny gpt per layout, all started at once."""
    cwd = tmp_path_factory.mktemp("layouts")
    procs = {name: subprocess.Popen([SHOAL, "run", *TINY, "train.steps=2", "log.tensorboard=false",
                                     f"log.name={name}", *extra], cwd=cwd, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, extra in LAYOUTS.items()}
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, f"{name} run failed:\n{output[-3000:]}"
    return {name: cwd / "runs" / name for name in LAYOUTS}


def outputs_of_every_format(loaded, tmp: Path, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch's outputs from each format, each read back the way a user would."""
    import onnxruntime
    from safetensors.torch import load_file
    out = {}
    export(loaded, "safetensors", tmp / "model.safetensors")
    rebuilt = build(loaded.cfg, loaded.spec).eval()
    rebuilt.load_state_dict(load_file(str(tmp / "model.safetensors")))
    out["safetensors"] = rebuilt(batch)
    export(loaded, "torch-export", tmp / "model.pt2")
    out["torch-export"] = torch.export.load(str(tmp / "model.pt2")).module()(batch)
    export(loaded, "onnx", tmp / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp / "model.onnx"))
    out["onnx"] = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_format_computes_the_checkpointed_model(layout, layout_runs, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    loaded = consolidate(layout_runs[layout], progress=False)
    assert loaded.step == 2
    # The consolidated weights are the checkpoint's tensors, as torch's own converter reads them
    # (for PP: both ranks' stages; for FSDP/TP: every rank's shards) ...
    dcp_to_torch_save(loaded.source, tmp_path / "reference.pt")
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)["model"]
    state = loaded.model.state_dict()
    assert set(reference) == set(state)
    for key, value in state.items():
        assert torch.equal(value, reference[key]), key
    # ... and they are trained, not the initial ones.
    initial = build(loaded.cfg, loaded.spec).state_dict()
    assert any(not torch.equal(initial[k], state[k]) for k in state)
    batch = example_inputs(loaded, batch=3, seed=1)  # not the traced batch size: the batch dim is dynamic
    with torch.no_grad():
        live = loaded.model(batch)
        for fmt, got in outputs_of_every_format(loaded, tmp_path, batch).items():
            assert got.shape == live.shape, fmt
            assert (got - live).abs().max().item() <= TOLERANCE, fmt


@pytest.mark.slow
def test_cli_export_writes_only_the_named_file(layout_runs, tmp_path):
    result = shoal("export", str(layout_runs["tp"]), "--step", "2", "--format", "safetensors",
                   "--out", str(tmp_path / "model.safetensors"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "2"
        assert "tp" in f.metadata()["shoal_config"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.slow
def test_bad_requests_get_one_line_and_leave_nothing(layout_runs, tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.toml").write_text((layout_runs["ddp"] / "config.toml").read_text())
    one_line_error(shoal_here(capfd, "export", str(empty), "--format", "onnx", "--out", str(out / "m.onnx")),
                   "no complete checkpoint")
    one_line_error(shoal_here(capfd, "export", str(layout_runs["ddp"]), "--step", "7", "--format", "onnx", "--out",
                              str(out / "m.onnx")), "--step 7", "steps 2")
    one_line_error(shoal_here(capfd, "export", str(layout_runs["ddp"]), "--format", "hf", "--out", str(out / "hf")),
                   "not a Hugging Face PreTrainedModel")
    branchy, _ = saved_run(tmp_path, "branchy", ["model.factory=tests.export.models:branchy"])
    for fmt in ("torch-export", "onnx"):
        one_line_error(shoal_here(capfd, "export", str(branchy), "--format", fmt, "--out", str(out / "m")),
                       "data-dependent control flow")
    assert list(out.iterdir()) == []  # no file, no temporary left behind


def test_hugging_face_model_round_trips_through_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM
    run_dir, weights = saved_run(tmp_path, "gpt2", ["model.factory=tests.export.models:tiny_gpt2"])
    loaded = consolidate(run_dir, progress=False)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in weights.items())
    export(loaded, "hf", tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
    assert list((tmp_path / "hf").glob("*.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    batch = example_inputs(loaded, batch=3)
    with torch.no_grad():
        live = loaded.model(input_ids=batch).logits
        assert (reloaded(input_ids=batch).logits - live).abs().max().item() <= TOLERANCE
        export(loaded, "torch-export", tmp_path / "gpt2.pt2")
        exported = torch.export.load(str(tmp_path / "gpt2.pt2")).module()(batch)
        assert (exported - live).abs().max().item() <= TOLERANCE
    assert np.isfinite(live.numpy()).all()


@pytest.mark.slow
def test_generate_samples_the_gpt(layout_runs, capfd):
    from shoal.export.generate import generate, sample_gpt
    loaded = consolidate(layout_runs["ddp"], progress=False)
    prompt = torch.tensor(list(b"def "))
    greedy = sample_gpt(loaded.model, prompt, 40, context=loaded.spec.seq_len, temperature=0)
    with torch.no_grad():  # each greedy token is the argmax after the (cropped) context before it
        for i in range(len(prompt), len(greedy)):
            window = greedy[max(0, i - loaded.spec.seq_len):i]
            assert greedy[i] == loaded.model(window[None])[0, -1].argmax()
    top1 = sample_gpt(loaded.model, prompt, 40, context=loaded.spec.seq_len, temperature=1.0, top_k=1,
                      generator=torch.Generator().manual_seed(3))
    assert torch.equal(top1, greedy)  # top-k 1 leaves only the likeliest token
    result = shoal_here(capfd, "generate", str(layout_runs["ddp"]), "--prompt", "def ", "--tokens", "30",
                        "--seed", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == generate(loaded, "def ", 30, seed=4)
    assert result.stdout.startswith("def ")


def test_generate_uses_hugging_face_generate(tmp_path):
    from shoal.export.generate import generate, sample_gpt
    from shoal.export.formats import LogitsOnly
    run_dir, _ = saved_run(tmp_path, "gpt2", ["model.factory=tests.export.models:tiny_gpt2"])
    loaded = consolidate(run_dir, progress=False)
    text = generate(loaded, "ab", 12, temperature=0)
    ours = sample_gpt(LogitsOnly(loaded.model), torch.tensor(list(b"ab")), 12, context=32, temperature=0)
    assert text == bytes(ours.tolist()).decode("utf-8", errors="replace")
