"""[sites] checks (one line naming the field) and `shoal sites certs` as a user types it."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from shoal import config
from shoal.cli import main
from shoal.federated import certs

GOOD = ["sync.method=diloco", "sites.name=a", "sites.listen=10.0.0.1:7443", "sites.peers=b=10.0.0.2:7443",
        "sites.certs=certs", "sites.internal=192.168.1.1"]


def test_a_good_sites_config_loads():
    cfg = config.load(None, GOOD)
    assert config.site_peers(cfg) == {"b": ("10.0.0.2", 7443)}


@pytest.mark.parametrize("override, field", [
    ("sites.internal=0.0.0.0", "sites.internal"),
    ("sites.internal=10.0.0.1", "sites.internal"),  # the address the other sites reach
    ("sites.internal=10.0.0.2", "sites.internal"),  # another site's address
    ("sites.listen=10.0.0.1", "sites.listen"),
    ("sites.peers=b:10.0.0.2:7443", "sites.peers"),
    ("sites.peers=a=10.0.0.3:1", "sites.peers"),
    ("sites.name=a b", "sites.name"),
    ("sites.certs=", "sites.certs"),
    ("sync.method=local_sgd", "sync.method"),
    ("sync.fragments=2", "sync.fragments"),
    ("sites.grace_seconds=0", "sites.grace_seconds"),
])
def test_a_bad_sites_config_names_the_field(override, field):
    with pytest.raises(config.ConfigError, match=field.replace(".", r"\.")) as err:
        config.load(None, GOOD + [override])
    assert "\n" not in str(err.value)


def test_a_batch_that_cannot_split_into_equal_site_shares_is_refused_before_launch():
    """Two sites each read half of train.batch_size = 6; site a's half of 3 cannot split between its 2
    workers. Refused before any worker starts, naming the field (the launcher runs check_layout)."""
    from shoal.parallel.compose import check_layout
    cfg = config.load(None, GOOD + ["train.batch_size=6", "model.dim=64", "model.n_layers=2"])
    assert check_layout(cfg, 1).dp == 1  # one worker: 3 samples a step
    with pytest.raises(config.ConfigError, match=r"train\.batch_size = 6 must split into 2 equal shares") as err:
        check_layout(cfg, 2)
    assert "\n" not in str(err.value) and "multiple of 4" in str(err.value)


def test_sites_certs_issues_one_certificate_per_site_and_revokes(tmp_path, capsys):
    shoal = ["sites", "certs", "--out", str(tmp_path)]
    assert main(shoal + ["--sites", "a,b"]) == 0
    out = capsys.readouterr().out
    assert "a.pem: issued" in out and "b.pem: issued" in out
    cert = x509.load_pem_x509_certificate((tmp_path / "a.pem").read_bytes())
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
    assert main(shoal + ["--revoke", "a"]) == 0
    assert cert.serial_number in certs.revoked_serials(tmp_path)
    assert main(shoal + ["--sites", "a,b", "--reissue", "b"]) == 0
    out = capsys.readouterr().out
    assert "a.pem: kept" in out and "b.pem: re-issued" in out
    assert main(shoal + ["--sites", "a b"]) == config.USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sites" in err
