"""More Hugging Face families, where the layers differ from each other or the tensor-parallel plan
uses more than colwise/rowwise: Gemma2, Gemma3 and Qwen3 with a sliding window (4) shorter than
the sequence (16) on some layers only, split into pipeline stages; Qwen3, Gemma3, Phi-3, OLMo2
and GPT-NeoX under TP=2. Each reproduces one process (loss to a relative 1e-4 over 5 steps and
after them, every reassembled parameter)."""

from __future__ import annotations

import pytest
import torch
import transformers

from shoal.models.hf import prepare
from shoal.parallel.hf_pipeline import split_hf
from shoal.parallel.pipeline import stage_layers
from tests.hf.hf_harness import run_hf_layouts
from tests.hf.tiny import save_tiny, tiny_config
from tests.parallel.parallel_harness import merged
from tests.world import run_world

LAYOUTS = {
    "gemma2_pp2": {"model": "gemma2", "pp": 2, "pp_schedule": "gpipe"},
    "gemma3_pp2": {"model": "gemma3", "pp": 2, "pp_schedule": "1f1b"},
    "qwen3_pp2": {"model": "qwen3", "pp": 2, "pp_schedule": "1f1b"},
    "qwen3_tp2": {"model": "qwen3", "tp": 2},  # replicated_with_grad_allreduce (q_norm, k_norm)
    "gemma3_tp2": {"model": "gemma3", "tp": 2},
    "phi3_tp2": {"model": "phi3", "tp": 2},  # colwise_gather_output, rowwise_split_input
    "olmo2_tp2": {"model": "olmo2", "tp": 2},
    "gpt_neox_tp2": {"model": "gpt_neox", "tp": 2},  # embedding_rowwise
}


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "qwen3"])
def test_pipeline_stages_keep_each_layers_settings(kind):
    """The stages, run one after the other in one process, give the whole model's logits: the
    second stage's layer is still layer 1 (full attention), not layer 0 (a window of 4)."""
    torch.manual_seed(0)
    config = tiny_config(kind)
    model = prepare(getattr(transformers, config.architectures[0])(config)).eval()
    assert len(set(config.layer_types)) == 2  # the layers differ
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        whole = model(ids).logits
        x = ids
        for stage in split_hf(model, stage_layers(config.num_hidden_layers, 2), [0, 1]):
            x = stage.eval()(x)
    assert torch.allclose(x, whole, atol=1e-5), float((x - whole).abs().max())


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_families")
    folders = {kind: str(save_tiny(kind, root / kind)) for kind in {s["model"] for s in LAYOUTS.values()}}
    out = tmp_path_factory.mktemp("hf_families_world2")
    run_world(run_hf_layouts, 2, LAYOUTS, folders, str(out))
    return merged(str(out), 2)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_family_layout_matches_single_process(world2, name):
    for rank, res in enumerate(world2[name]):
        assert "error" not in res, f"rank {rank}:\n{res.get('error')}"
        assert res["loss_rel_err"] < 1e-4, (rank, res["losses"], res["ref_losses"])
        assert res["param_max_err"] < 1e-4, (rank, res["param_max_err"])
        assert res["steps"] == 5 and res["n_params"] > 0
        assert res["local_numel"] < res["full_numel"]  # split, not replicated
        if LAYOUTS[name].get("tp", 1) > 1:
            assert any("attn" in k or "attention" in k for k in res["split"]), res["split"]
            assert any("mlp" in k for k in res["split"]), res["split"]


@pytest.mark.parametrize("kind, style, where", [
    ("deepseek_v2", "mla_kv_a_proj", "layers.*.self_attn.kv_a_proj_with_mqa (Linear)"),
    ("llama", "no_such_style", "layers.*.mlp.down_proj (Linear)"),  # a plan naming a style nobody knows
])
def test_a_style_shoal_cannot_apply_is_refused_before_workers_start(tmp_path, monkeypatch, capsys, kind, style,
                                                                    where):
    """`shoal run` with parallel.tp = 2 (its main, in this process: no worker may start) prints one
    line naming the module and the style, and returns 2."""
    import json
    from shoal import cli
    from tests.hf.test_hf_run import HF
    folder = save_tiny(kind, tmp_path / "m")
    if style == "no_such_style":
        config = json.loads((folder / "config.json").read_text())
        config["base_model_tp_plan"] = {"layers.*.mlp.down_proj": style}
        (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    code = cli.main(["run", *HF, "train.steps=2", f"model.hf={folder}", "parallel.tp=2"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert f"splits {where} as '{style}'" in lines[0] and "parallel.tp = 1" in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()
