"""Checkpoints in one process: atomic publish, retention, a crash mid-save, exact round trip."""

import torch

from shoal.runtime.checkpoint import Checkpointer, checkpoint_steps, latest_checkpoint


def model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_weights_moments_and_trainer_state(tmp_path):
    model, opt = model_and_optimizer()
    ck = Checkpointer(tmp_path, keep=2)
    ck.save(5, [model], opt, {"step": 5, "rng": torch.get_rng_state()})
    fresh = torch.nn.Linear(4, 3)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    state = ck.load(latest_checkpoint(tmp_path), [fresh], fresh_opt)
    assert state["step"] == 5
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_opt.state[fresh.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])


def test_keep_last_n_and_half_written_checkpoints_are_never_picked(tmp_path):
    model, opt = model_and_optimizer()
    ck = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ck.save(step, [model], opt, {"step": step})
    assert [s for s, _ in checkpoint_steps(tmp_path)] == [2, 3]
    # a crash mid-save leaves only the hidden staging folder, without meta.json
    staging = tmp_path / ".tmp-step_00000004"
    staging.mkdir()
    (staging / "__0_0.distcp").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    ck.save(5, [model], opt, {"step": 5})
    assert not staging.exists()  # cleaned up by the next save
    assert latest_checkpoint(tmp_path).name == "step_00000005"


def test_async_save_publishes_on_wait(tmp_path):
    model, opt = model_and_optimizer()
    ck = Checkpointer(tmp_path, keep=0, async_save=True)
    ck.save(1, [model], opt, {"step": 1})
    ck.wait()
    assert latest_checkpoint(tmp_path).name == "step_00000001"


def test_several_model_parts_per_rank_save_and_load_under_their_own_names(tmp_path):
    """Interleaved pipeline stages: two parts of one model, one optimizer."""
    torch.manual_seed(0)
    whole = torch.nn.ModuleDict({"layers": torch.nn.ModuleDict({str(i): torch.nn.Linear(3, 3) for i in range(4)})})
    parts = []
    for keep in ((0, 2), (1, 3)):
        part = torch.nn.Module()
        part.layers = torch.nn.ModuleDict({str(i): whole["layers"][str(i)] for i in keep})
        parts.append(part)
    opt = torch.optim.AdamW(whole.parameters(), lr=0.1)
    sum(layer(torch.randn(2, 3)).sum() for layer in whole["layers"].values()).backward()
    opt.step()
    ck = Checkpointer(tmp_path, keep=1)
    ck.save(1, parts, opt, {"step": 1})
    saved = {k: v.clone() for k, v in whole.state_dict().items()}
    with torch.no_grad():
        for p in whole.parameters():
            p.zero_()
    ck.load(latest_checkpoint(tmp_path), parts, opt)
    assert all(torch.equal(whole.state_dict()[k], v) for k, v in saved.items())
    assert sorted(torch.load(latest_checkpoint(tmp_path) / "trainer_rank0.pt", weights_only=True)) == ["step"]
