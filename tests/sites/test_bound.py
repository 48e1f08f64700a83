"""The launcher's store listens on one address, not every interface (shoal/launch/bound.py); one process."""

from __future__ import annotations

import os

import pytest

from shoal.config import ConfigError
from shoal.launch.bound import BoundStore, interface_of
from tests.sites.listening import listening, wildcard


def test_bound_store_listens_on_its_address_only():
    bound = BoundStore("127.0.0.1", field="sites.internal")
    try:
        bound.store.set("key", "value")
        mine = [entry for entry in listening([os.getpid()]) if entry[1] == bound.port]
        assert mine == [("127.0.0.1", bound.port)], mine  # a plain TCPStore shows ('::', port) here
        assert not wildcard(mine)
        assert bound.gloo_environment() in ({"GLOO_SOCKET_IFNAME": "lo"}, {})  # {} when the user set one
    finally:
        bound.close()


def test_interface_of_and_an_address_this_host_lacks():
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("198.51.100.77") is None  # TEST-NET-2: no interface of this host holds it
    with pytest.raises(ConfigError, match="sites.internal: cannot listen on 198.51.100.77"):
        BoundStore("198.51.100.77", field="sites.internal")


def test_a_site_rendezvous_is_its_internal_address_and_a_bad_one_is_refused_before_the_run_dir():
    from shoal import config
    from shoal.launch.run import local_rendezvous
    site = ["sync.method=diloco", "sites.name=a", "sites.listen=127.0.0.1:7443", "sites.peers=b=127.0.0.1:7444",
            "sites.certs=certs"]
    assert local_rendezvous(config.load(None, [])).endpoint == "127.0.0.1:0"  # not a site: loopback
    rendezvous = local_rendezvous(config.load(None, site + ["sites.internal=::1"]))
    assert (rendezvous.endpoint, rendezvous.field) == ("[::1]:0", "sites.internal")
    for bad in ("198.51.100.77", "no-such-host.invalid"):
        with pytest.raises(ValueError, match=rf"^sites\.internal: cannot listen on {bad}:0 \(") as err:
            local_rendezvous(config.load(None, site + [f"sites.internal={bad}"]))
        assert "\n" not in str(err.value)
