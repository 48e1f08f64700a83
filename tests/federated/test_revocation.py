"""Revocation against a running server over mutual TLS: a name's every certificate is revoked, and a
missing or unreadable CRL shuts the door (at start and while running) instead of opening it."""

from __future__ import annotations

import shutil
import subprocess
import os
import sys

import grpc
import pytest

from shoal.config import ConfigError, load
from shoal.federated import certs
from shoal.federated import federation_pb2 as pb
from shoal.federated import federation_pb2_grpc as pb_grpc
from shoal.federated.rounds import RoundDriver
from shoal.federated.server import start_grpc

from fed_helpers import channel, write_config

JOIN = pb.JoinRequest(num_samples=10, num_val_samples=2, in_features=6, num_classes=2)


def put(path, data: bytes) -> None:
    """Replace a file as an administrator's tools do (a new inode), so the server sees the change."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def join_code(port: int, folder, name: str) -> grpc.StatusCode:
    with channel(port, folder, name) as ch:
        try:
            pb_grpc.FederationStub(ch).Join(JOIN, timeout=10)
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            return err.code()


# The tests below build on each other's revocations through one module-scoped server: they run in
# order in one process (tests/conftest.py keeps a file's tests on one xdist worker).


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server that never starts a round (it waits for more clients than exist): only Joins matter here."""
    tmp = tmp_path_factory.mktemp("revocation")
    folder = tmp / "certs"
    certs.make_all(folder, ["site", "other"])
    shutil.copytree(folder, tmp / "old")  # a copy of site's first key pair, as a careless site might keep
    certs.issue(folder, "site")  # a second certificate for the same name
    cfg = load(write_config(tmp / "fed.toml", folder, tmp / "runs", "crl", 0, min_clients=10))
    run_dir = tmp / "runs" / "crl"
    run_dir.mkdir(parents=True)
    driver = RoundDriver(cfg, run_dir)
    grpc_server, port = start_grpc(cfg, driver, "crl")
    yield cfg, driver, port, folder, tmp
    grpc_server.stop(0)


@pytest.mark.slow
def test_revoking_a_name_revokes_every_certificate_it_was_issued(server):
    _, _, port, folder, tmp = server
    assert join_code(port, tmp / "old", "site") == grpc.StatusCode.OK  # both certificates of 'site' work
    assert join_code(port, folder, "site") == grpc.StatusCode.OK
    done = subprocess.run([sys.executable, "-m", "shoal.cli", "fed", "certs", "--out", str(folder), "--revoke", "site"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "revoked every certificate issued to site" in done.stdout
    assert len(certs.serials_of(folder, "site")) == 2
    assert join_code(port, tmp / "old", "site") == grpc.StatusCode.PERMISSION_DENIED
    assert join_code(port, folder, "site") == grpc.StatusCode.PERMISSION_DENIED
    assert join_code(port, folder, "other") == grpc.StatusCode.OK


@pytest.mark.slow
def test_an_unreadable_crl_refuses_everyone_until_restored(server, caplog):
    _, _, port, folder, _ = server
    crl = folder / "crl.pem"
    good = crl.read_bytes()
    crl.unlink()
    assert join_code(port, folder, "other") == grpc.StatusCode.UNAVAILABLE
    assert "revocation list cannot be checked" in caplog.text and "crl.pem is missing" in caplog.text
    put(crl, b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
    assert join_code(port, folder, "other") == grpc.StatusCode.UNAVAILABLE
    other_ca = folder.parent / "other-ca"
    certs.make_ca(other_ca)
    put(crl, (other_ca / "crl.pem").read_bytes())
    assert join_code(port, folder, "other") == grpc.StatusCode.UNAVAILABLE
    assert "not signed by this federation's CA" in caplog.text
    put(crl, good)
    assert join_code(port, folder, "other") == grpc.StatusCode.OK
    assert join_code(port, folder, "site") == grpc.StatusCode.PERMISSION_DENIED  # still revoked


@pytest.mark.slow
def test_the_server_refuses_to_start_without_its_crl(server, caplog):
    cfg, driver, _, folder, _ = server
    crl = folder / "crl.pem"
    saved = crl.read_bytes()
    crl.unlink()
    try:
        with pytest.raises(ConfigError, match="will not start without the CA's revocation list"):
            start_grpc(cfg, driver, "crl")
        # opting out starts it with a warning; a CRL that appears is then enforced, and losing it fails closed
        cfg.federated.require_crl = False
        lax, port = start_grpc(cfg, driver, "crl-lax")
        try:
            assert "revocation is off" in caplog.text
            assert join_code(port, folder, "site") == grpc.StatusCode.OK
            put(crl, saved)
            assert join_code(port, folder, "site") == grpc.StatusCode.PERMISSION_DENIED
            crl.unlink()
            assert join_code(port, folder, "other") == grpc.StatusCode.UNAVAILABLE
        finally:
            lax.stop(0)
    finally:
        cfg.federated.require_crl = True
        put(crl, saved)


def test_reissuing_replaces_and_revokes_and_a_rerun_keeps(tmp_path):
    folder = tmp_path / "certs"
    certs.make_all(folder, ["a"])
    first = certs.serials_of(folder, "a")
    kept = dict((p.name, what) for p, what in certs.make_all(folder, ["a", "b"]))
    assert kept["a.pem"].startswith("kept") and kept["b.pem"] == "issued"
    assert certs.serials_of(folder, "a") == first  # adding a site re-issues no one
    again = dict((p.name, what) for p, what in certs.make_all(folder, [], reissue=("a",)))
    assert "revoked" in again["a.pem"] and again["server.pem"].startswith("kept")
    assert first <= certs.revoked_serials(folder) and len(certs.serials_of(folder, "a")) == 2
    assert not (certs.serials_of(folder, "a") - first) & certs.revoked_serials(folder)


def test_only_a_leaf_client_certificate_identifies_a_site(server, caplog):
    """The CA's own pair and a server-purpose leaf both chain to the CA, yet neither may pose as a site."""
    _, _, port, folder, _ = server
    assert join_code(port, folder, "ca") == grpc.StatusCode.PERMISSION_DENIED
    assert "it is a CA certificate (basicConstraints CA:TRUE)" in caplog.text
    certs.issue(folder, "webhost", server=True)  # a leaf for serverAuth only, with a site-like name
    assert join_code(port, folder, "webhost") != grpc.StatusCode.OK
    assert "'webhost' joined" not in caplog.text
    assert join_code(port, folder, "other") == grpc.StatusCode.OK


def test_an_older_crl_put_back_is_refused_as_a_rollback(server, caplog):
    _, _, port, folder, _ = server
    crl = folder / "crl.pem"
    older = crl.read_bytes()
    certs.write_crl(folder, sorted(certs.revoked_serials(folder)))  # the same list, the next number
    newer = crl.read_bytes()
    number = certs.crl_number(certs.load_crl(folder))
    assert join_code(port, folder, "other") == grpc.StatusCode.OK  # the server has read the newer one
    put(crl, older)
    try:
        assert join_code(port, folder, "other") == grpc.StatusCode.UNAVAILABLE
        assert f"older than number {number} this server already read (a rollback)" in caplog.text
    finally:
        put(crl, newer)
    assert join_code(port, folder, "other") == grpc.StatusCode.OK
