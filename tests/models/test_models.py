"""Models in one process: the debug GPT, a user factory, model/data mismatches, the loss."""

import pytest
import torch
from torch import nn

from shoal import config
from shoal.config import ConfigError
from shoal.data.spec import DataSpec
from shoal.models import build_model, compute_loss

TOKENS = DataSpec(kind="tokens", vocab_size=256, seq_len=16)


def test_gpt_debug_flavour_predicts_every_position():
    model = build_model(config.load(None).model, TOKENS)
    logits = model(torch.randint(0, 256, (3, 16)))
    assert logits.shape == (3, 16, 256)
    # causal: changing the last token leaves earlier positions' outputs unchanged
    a = torch.randint(0, 256, (1, 16))
    b = a.clone()
    b[0, -1] = (b[0, -1] + 1) % 256
    assert torch.allclose(model(a)[0, :-1], model(b)[0, :-1], atol=1e-6)


def test_user_factory_is_called_with_the_data_spec(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def build(spec):\n    return torch.nn.Linear(spec.in_features, spec.num_classes)\n"
        "def bad(spec):\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = DataSpec(kind="classes", in_features=5, num_classes=3)
    model = build_model(config.load(None, ["model.factory=my_models:build"]).model, spec)
    assert isinstance(model, nn.Linear) and model.out_features == 3
    with pytest.raises(ConfigError, match="returned int"):
        build_model(config.load(None, ["model.factory=my_models:bad"]).model, spec)
    with pytest.raises(ConfigError, match="cannot be imported"):
        build_model(config.load(None, ["model.factory=my_models:nope"]).model, spec)


def test_model_and_data_mismatch_is_explained():
    with pytest.raises(ConfigError, match="needs feature data"):
        build_model(config.load(None, ["model.name=mlp"]).model, TOKENS)


def test_loss_is_cross_entropy_for_labels_and_mse_for_floats():
    logits = torch.tensor([[2.0, 0.0]])
    assert torch.isclose(compute_loss(logits, torch.tensor([0])), torch.log1p(torch.exp(torch.tensor(-2.0))))
    assert torch.isclose(compute_loss(torch.tensor([[1.0]]), torch.tensor([3.0])), torch.tensor(4.0))
