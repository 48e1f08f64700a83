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
