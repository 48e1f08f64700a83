"""`shoal fed certs` as a user types it, and the certificates it makes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cryptography import x509

from shoal.federated.certs import revoked_serials

pytestmark = pytest.mark.slow  # runs the shoal command


def shoal(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shoal.cli", "fed", *args], capture_output=True, text=True,
                          timeout=120)


def test_certs_then_revoke(tmp_path):
    out = tmp_path / "certs"
    made = shoal("certs", "--out", str(out), "--clients", "site1,site2", "--hosts", "localhost,10.1.2.3")
    assert made.returncode == 0, made.stderr
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    site = x509.load_pem_x509_certificate((out / "site1.pem").read_bytes())
    site.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert oct((out / "site1.key").stat().st_mode)[-3:] == "600"
    assert revoked_serials(out) == set()
    revoked = shoal("certs", "--out", str(out), "--revoke", "site2")
    assert revoked.returncode == 0, revoked.stderr
    serial = x509.load_pem_x509_certificate((out / "site2.pem").read_bytes()).serial_number
    assert revoked_serials(out) == {serial}
    again = shoal("certs", "--out", str(out), "--clients", "site1,site3")
    assert "site1.pem: kept" in again.stdout and "site3.pem: issued" in again.stdout
    assert x509.load_pem_x509_certificate((out / "site1.pem").read_bytes()).serial_number == site.serial_number


def test_bad_names_and_missing_ca_are_one_line_errors(tmp_path):
    bad = shoal("certs", "--out", str(tmp_path / "c"), "--clients", "../etc")
    assert bad.returncode == 2 and bad.stderr.startswith("shoal: error: certificate name '../etc'")
    missing = shoal("certs", "--out", str(tmp_path / "none"), "--revoke", "x")
    assert missing.returncode == 2 and "shoal: error:" in missing.stderr


def test_overrides_go_anywhere_on_the_line(tmp_path):
    """`section.key=value` after an option is an override for every `shoal fed` subcommand, in typed order."""
    from shoal.cli import build_parser

    parse = build_parser().parse_args
    args = parse(["fed", "simulate", "c.toml", "a.b=1", "--clients", "20", "federated.rounds=2", "--workers", "3",
                  "x.y=z"])
    assert (args.config, args.overrides, args.clients, args.workers) == ("c.toml", ["a.b=1", "federated.rounds=2",
                                                                                    "x.y=z"], 20, 3)
    args = parse(["fed", "client", "c.toml", "--data", "d", "federated.rounds=2", "--server", "h:1", "--name", "n"])
    assert args.overrides == ["federated.rounds=2"] and args.name == "n"
    assert parse(["fed", "server", "c.toml", "federated.rounds=2"]).overrides == ["federated.rounds=2"]
    config = tmp_path / "c.toml"
    config.write_text("")
    # as typed by a user: the late override reaches the config (and its mistake is reported in one line)
    late = shoal("simulate", str(config), "--clients", "20", "federated.strategy=fedfoo")
    assert late.returncode == 2 and late.stderr.startswith("shoal: error: federated.strategy = 'fedfoo'")
    stray = shoal("simulate", str(config), "--clients", "20", "notanoverride")
    assert stray.returncode == 2 and "unrecognized arguments: notanoverride" in stray.stderr
