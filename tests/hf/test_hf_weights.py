"""A model.hf folder's weights in every layout transformers writes (one or several safetensors,
one or several .bin), the one line for weights that do not fit the model, the one line for a
folder without weights, and each rank of a sharded layout reading only its share."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from shoal.config import load
from shoal.data.spec import DataSpec
from shoal.models import build_model
from shoal.models.hf_weights import checkpoint_keys, weight_files
from tests.hf.tiny import tiny_config
from tests.world import run_world

TOKENS = DataSpec(kind="tokens", vocab_size=256, seq_len=8)
LAYOUTS = ("safetensors", "safetensors_sharded", "bin", "bin_sharded")


def save_layout(kind: str, folder: Path, layout: str, seed: int = 3) -> transformers.PreTrainedModel:
    """A tiny `kind` model with random weights (from `seed`) saved in `layout`; returns it.
    transformers 5 writes only safetensors; its .bin layouts come from huggingface_hub, which
    wrote them for transformers 4 (pytorch_model.bin, or parts + pytorch_model.bin.index.json)."""
    config = tiny_config(kind)
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config)
    if layout.startswith("safetensors"):
        model.save_pretrained(folder, max_shard_size="20KB" if layout.endswith("sharded") else "5GB")
    else:
        from huggingface_hub import save_torch_state_dict
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        state = {key: value.contiguous() for key, value in model.state_dict().items()}
        save_torch_state_dict(state, folder, safe_serialization=False,
                              max_shard_size="20KB" if layout.endswith("sharded") else "5GB")
    return model


def built(folder: Path, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(load(None, [f"model.hf={folder}"]).model, TOKENS)


def said(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "shoal"]


def first_loss(model, seed: int = 1) -> float:
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_the_saved_weights(tmp_path, layout, caplog):
    saved = save_layout("llama", tmp_path / layout, layout)
    names = sorted(p.name for p in weight_files(tmp_path / layout))
    assert len(names) > 1 if layout.endswith("sharded") else len(names) == 1, names
    assert names[0].endswith(".safetensors" if layout.startswith("safetensors") else ".bin")
    with caplog.at_level(logging.WARNING, logger="shoal"):
        model = built(tmp_path / layout)
    assert not said(caplog)  # everything loaded: nothing to say
    for (name, a), b in zip(model.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a, b), name
    # the first step's loss is the saved model's, not the one a config alone gives
    scratch = tmp_path / "scratch"
    tiny_config("llama").save_pretrained(scratch)
    assert first_loss(model) == pytest.approx(first_loss(saved), abs=1e-6)
    assert abs(first_loss(model) - first_loss(built(scratch))) > 1e-3


def test_tied_weights_are_not_missing_and_strays_are_one_line(tmp_path, caplog):
    saved = save_layout("gpt2", tmp_path / "g", "bin_sharded")  # lm_head.weight is wte's tensor
    with caplog.at_level(logging.WARNING, logger="shoal"):
        model = built(tmp_path / "g")
    assert not said(caplog)
    assert torch.equal(model.lm_head.weight, saved.transformer.wte.weight)
    # a checkpoint short of two weights, with three of another model's
    state = {k: v.contiguous() for k, v in saved.state_dict().items() if k != "lm_head.weight"}
    del state["transformer.h.0.mlp.c_fc.weight"], state["transformer.h.1.ln_2.bias"]
    state.update({f"vision.extra_{i}": torch.zeros(2) for i in range(3)})
    part = tmp_path / "partial"
    tiny_config("gpt2").save_pretrained(part)
    save_file(state, part / "model.safetensors", metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shoal"):
        built(part)
    lines = said(caplog)
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "2 weights not in the checkpoint" in lines[0] and "transformer.h.0.mlp.c_fc.weight" in lines[0]
    assert "3 in the checkpoint that the model has no place for" in lines[0] and "vision.extra_0" in lines[0]


def test_a_folder_without_weights_says_it_trains_from_scratch_once(tmp_path, caplog):
    tiny_config("llama").save_pretrained(tmp_path / "c")
    with caplog.at_level(logging.WARNING, logger="shoal"):
        built(tmp_path / "c")
    lines = said(caplog)
    assert len(lines) == 1 and "holds no weights" in lines[0] and "training from scratch" in lines[0], lines


# ---- each rank of a sharded layout builds on the meta device and reads its share -------------

SHARDED = {"fsdp": {"dp_shard": 2}, "tp": {"tp": 2}, "pp": {"pp": 2, "pp_microbatches": 2}}
SHARDED_4 = {"fsdp_over_tp": {"dp_shard": 2, "tp": 2}}  # FSDP shards TP's shards again: strided placements


def _load_sharded(rank: int, world: int, folders: dict, out_dir: str, layouts: dict = SHARDED) -> None:
    from shoal.models.hf_weights import load_per_rank, tied_aliases
    from shoal.parallel.compose import check_layout, parallelize
    from shoal.runtime.lazy import dtensor_type
    from tests.hf.hf_harness import hf_config
    results = {}
    for (kind, layout), folder in folders.items():
        for name, parallel in layouts.items():
            cfg = hf_config(folder, **parallel)
            dims = check_layout(cfg, world)
            model = build_model(cfg.model, TOKENS, params_on_meta=True)
            on_meta = all(p.is_meta for p in model.parameters())
            tied = tied_aliases(model)  # as the worker does: before the split
            pm = parallelize(model, dims, dims.build_mesh("cpu"), cfg, torch.device("cpu"))
            read = load_per_rank(pm.model_parts, folder, torch.device("cpu"), tied)
            saved = getattr(transformers, tiny_config(kind).architectures[0]).from_pretrained(folder).state_dict()
            worst, local = 0.0, 0
            total = sum(p.numel() for p in getattr(transformers, tiny_config(kind).architectures[0])(
                tiny_config(kind)).parameters())
            for part in pm.model_parts:
                for key, value in part.state_dict().items():
                    if isinstance(value, dtensor_type()):
                        local += value.to_local().numel()
                        value = value.full_tensor()
                    else:
                        local += value.numel()
                    worst = max(worst, float((value - saved[key]).abs().max()) if value.numel() else 0.0)
            results[f"{kind}/{layout}/{name}"] = {"on_meta": on_meta, "worst": worst, "read": read,
                                                  "local": local, "total": total}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.mark.slow
def test_sharded_layouts_read_only_their_share(tmp_path):
    folders = {}
    # GPT-2's output layer is tied to its embeddings: save_pretrained stores them once, and the
    # last pipeline stage holds the output layer alone
    for kind, layout in (("llama", "bin_sharded"), ("gpt2", "safetensors_sharded")):
        save_layout(kind, tmp_path / f"{kind}_{layout}", layout)
        folders[(kind, layout)] = str(tmp_path / f"{kind}_{layout}")
    run_world(_load_sharded, 2, folders, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name in ranks[0]:
        for rank, res in enumerate(ranks):
            assert res[name]["on_meta"], name  # nothing was read before the layout split the model
            assert res[name]["worst"] == 0.0, (name, rank, res[name])
            assert res[name]["local"] < res[name]["total"], (name, rank, res[name])  # a share, not the whole
        if name.endswith("/pp"):  # each stage read only the tensors of its own layers
            assert ranks[0][name]["read"] < len(checkpoint_keys(folders[tuple(name.split("/")[:2])]))


@pytest.mark.slow
def test_fsdp_over_tensor_parallel_reads_its_strided_share(tmp_path):
    save_layout("llama", tmp_path / "llama", "safetensors_sharded")
    folders = {("llama", "safetensors_sharded"): str(tmp_path / "llama")}
    run_world(_load_sharded, 4, folders, str(tmp_path), SHARDED_4)
    for rank in range(4):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())["llama/safetensors_sharded/fsdp_over_tp"]
        assert res["on_meta"] and res["worst"] == 0.0, (rank, res)
        assert res["local"] < res["total"] / 2, (rank, res)  # about a quarter of the model
