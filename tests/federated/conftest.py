"""One set of certificates for the federated tests (a CA, the sites, a revoked one, a forged one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fed_helpers import SITES
from shoal.federated import certs


@pytest.fixture(scope="session")
def certs_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    certs.make_all(folder, list(SITES) + ["revoked"])
    certs.revoke(folder, "revoked")
    other = folder / "other-ca"
    certs.make_all(other, ["alpha"])  # same name, wrong CA
    return folder
