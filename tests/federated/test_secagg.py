"""Secure aggregation: the server's view of one update is noise, the sum is exact, dropouts recover."""

import numpy as np
import pytest

from shoal.federated.secagg import (PRIME, SecAggClient, SecAggServer, dequantize, quantize, shamir_combine,
                                    shamir_split)


def test_shamir_any_threshold_subset_rebuilds_and_fewer_do_not():
    secret = int.from_bytes(b"\x07" * 32, "big")
    shares = shamir_split(secret, n=5, threshold=3)
    assert shamir_combine(shares[:3]) == secret
    assert shamir_combine([shares[4], shares[1], shares[2]]) == secret
    assert shamir_combine(shares[:2]) != secret
    assert all(0 <= y < PRIME for _, y in shares)


def run_protocol(inputs: dict[str, np.ndarray], threshold: int, drop_before_mask=(), drop_before_unmask=()):
    """All four phases in memory, exactly as the server routes them; returns (sum, masked views)."""
    clients = {cid: SecAggClient(cid, threshold) for cid in inputs}
    peers = {cid: c.public_keys() for cid, c in clients.items()}
    shares = {cid: c.share_keys(peers) for cid, c in clients.items()}
    masked = {}
    for cid, client in clients.items():
        if cid in drop_before_mask:
            continue
        received = {sender: out[cid] for sender, out in shares.items()}
        masked[cid] = client.mask(inputs[cid], received)
    survivors, dropped = sorted(masked), sorted(set(shares) - set(masked))
    seed_shares, key_shares = {}, {}
    for holder in survivors:
        if holder in drop_before_unmask:
            continue
        seeds, keys = clients[holder].unmask(survivors, dropped)
        for owner, value in seeds.items():
            seed_shares.setdefault(owner, {})[holder] = value
        for owner, value in keys.items():
            key_shares.setdefault(owner, {})[holder] = value
    total = SecAggServer(threshold).unmask_sum(peers, set(shares), masked, seed_shares, key_shares)
    return dequantize(total), masked


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    return {f"site{i}": rng.normal(size=2048) * (i + 1) for i in range(5)}


def test_sum_is_exact(inputs):
    total, _ = run_protocol(inputs, threshold=3)
    np.testing.assert_allclose(total, sum(inputs.values()), atol=1e-6)


def test_dropout_before_masking_is_recovered_from_shares(inputs):
    total, masked = run_protocol(inputs, threshold=3, drop_before_mask=("site4",))
    assert "site4" not in masked
    np.testing.assert_allclose(total, sum(v for k, v in inputs.items() if k != "site4"), atol=1e-6)


def test_dropout_after_masking_keeps_its_input(inputs):
    # site1 sent its masked input and then went away before unmasking: the others' shares suffice
    total, _ = run_protocol(inputs, threshold=3, drop_before_mask=("site4",), drop_before_unmask=("site1",))
    np.testing.assert_allclose(total, sum(v for k, v in inputs.items() if k != "site4"), atol=1e-6)


def test_one_masked_update_is_indistinguishable_from_noise():
    structured = {f"site{i}": np.full(8192, 1.0 if i == 0 else 0.5) for i in range(3)}
    structured["site0"][::2] = -3.0  # a strong pattern the masked view must not show
    _, masked = run_protocol(structured, threshold=2)
    view = masked["site0"]
    uniform = view.astype(np.float64) / 2.0 ** 64
    assert abs(uniform.mean() - 0.5) < 0.02 and abs(uniform.std() - (1 / 12) ** 0.5) < 0.02
    assert abs(np.mean(view >> np.uint64(63)) - 0.5) < 0.03  # the sign bit carries no information
    assert abs(np.corrcoef(uniform, structured["site0"])[0, 1]) < 0.05
    counts = np.bincount((view & np.uint64(0xFF)).astype(np.int64), minlength=256)
    chi2 = ((counts - len(view) / 256) ** 2 / (len(view) / 256)).sum()
    assert chi2 < 400  # 255 degrees of freedom: far below, a uniform byte; a pattern would explode it
    assert not np.array_equal(view, quantize(structured["site0"]))


def test_client_refuses_to_reveal_both_secrets_of_one_peer(inputs):
    clients = {cid: SecAggClient(cid, 3) for cid in inputs}
    peers = {cid: c.public_keys() for cid, c in clients.items()}
    shares = {cid: c.share_keys(peers) for cid, c in clients.items()}
    me = clients["site0"]
    me.mask(inputs["site0"], {s: out["site0"] for s, out in shares.items()})
    with pytest.raises(ValueError, match="both secrets"):
        me.unmask(["site0", "site1", "site2"], ["site2"])


def test_too_few_shares_cannot_unmask(inputs):
    with pytest.raises(ValueError, match="shares"):
        run_protocol(inputs, threshold=4, drop_before_unmask=("site0", "site1"))


def test_threshold_above_the_peer_count_is_refused(inputs):
    client = SecAggClient("site0", threshold=9)
    with pytest.raises(ValueError, match="needs 9"):
        client.share_keys({"site0": client.public_keys()})
