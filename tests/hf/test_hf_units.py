"""One process: how Shoal reads a Hugging Face model's outputs, calls it on a batch, finds
its blocks, checks a loss, and loads a saved folder (weights or config only)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from shoal.config import ConfigError, load
from shoal.data.spec import DataSpec
from shoal.models import Loss, build_model, call_model, compute_loss
from shoal.models.hf import logits_of
from shoal.parallel.blocks import model_blocks
from tests.hf.tiny import save_tiny

TOKENS = DataSpec(kind="tokens", vocab_size=256, seq_len=8)


def test_outputs_of_every_shape_give_their_logits():
    logits = torch.randn(2, 3)
    assert logits_of(logits) is logits
    assert logits_of({"logits": logits}) is logits
    assert logits_of((logits, torch.zeros(1))) is logits
    out = transformers.modeling_outputs.SequenceClassifierOutput(logits=logits)
    assert torch.equal(compute_loss(out, torch.tensor([0, 1])), compute_loss(logits, torch.tensor([0, 1])))


def test_weights_come_from_the_folder_and_a_config_alone_initialises(tmp_path):
    folder = save_tiny("llama", tmp_path / "w", weights=True, seed=3)
    saved = transformers.LlamaForCausalLM.from_pretrained(folder)
    model = build_model(load(None, [f"model.hf={folder}"]).model, TOKENS)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
    assert model.config.use_cache is False
    # config only: built from the seed, so two builds with one seed agree
    folder = save_tiny("llama", tmp_path / "c")
    torch.manual_seed(0)
    a = build_model(load(None, [f"model.hf={folder}"]).model, TOKENS)
    torch.manual_seed(0)
    b = build_model(load(None, [f"model.hf={folder}"]).model, TOKENS)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    # a trained state dict goes back through save_pretrained / from_pretrained unchanged
    a.save_pretrained(tmp_path / "out")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert set(back.state_dict()) == set(a.state_dict())


def test_a_dict_batch_is_passed_by_name(tmp_path):
    model = build_model(load(None, [f"model.hf={save_tiny('bert', tmp_path / 'b')}"]).model, TOKENS).eval()
    ids = torch.randint(0, 256, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    out = call_model(model, {"input_ids": ids, "attention_mask": mask})
    assert torch.equal(out.logits, model(input_ids=ids, attention_mask=mask).logits)
    assert not torch.equal(out.logits, model(ids).logits)  # the mask was used
    own = Loss("model")(call_model(model, {"input_ids": ids}, labels=ids), {"input_ids": ids}, ids)
    assert own.shape == () and own > 0


def test_blocks_are_found_for_any_model(tmp_path):
    llama = build_model(load(None, [f"model.hf={save_tiny('llama', tmp_path / 'l')}"]).model, TOKENS)
    assert [type(b).__name__ for b in model_blocks(llama)] == ["LlamaDecoderLayer"] * 2

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.ff = nn.Linear(4, 4)

    class Custom(nn.Module):  # no hints at all: the ModuleList of one class gives the blocks
        def __init__(self):
            super().__init__()
            self.embed, self.stack, self.head = nn.Embedding(8, 4), nn.ModuleList(Layer() for _ in range(3)), \
                nn.Linear(4, 8)

    custom = Custom()
    assert model_blocks(custom) == list(custom.stack)
    assert model_blocks(custom, ["Linear"]) == [layer.ff for layer in custom.stack] + [custom.head]
    with pytest.raises(ConfigError, match=r"Layr not in Custom \(did you mean Layer\?\); its classes: Layer"):
        model_blocks(custom, ["Layr"])


def test_a_loss_must_be_a_finite_scalar():
    logits = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ConfigError, match="returned \\(2,\\), not a scalar"):
        Loss("tests.hf.test_hf_units:per_sample")(logits, logits, torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="returned nan"):
        Loss("tests.hf.test_hf_units:nan_loss")(logits, logits, None)
    with pytest.raises(ConfigError, match="model.loss = 'tests.hf.nope:x' cannot be imported"):
        Loss("tests.hf.nope:x")


def per_sample(output, batch):
    return torch.nn.functional.cross_entropy(output, batch["targets"], reduction="none")


def nan_loss(output, batch):
    return output.sum() * float("nan")
