"""Certificates of a sites job: one CA, one certificate per site (it both listens and dials), a CRL.

Built on shoal/federated/certs.py (the same CA, issuance record and fail-closed CRL): a site's
certificate carries both serverAuth and clientAuth, and its host names and addresses, because a
site's leader accepts the sites that sort after it and dials the ones that sort before it.
`--revoke NAME` lists every certificate ever issued to NAME in crl.pem; the other sites refuse it
on its next connection. `--reissue NAME` gives NAME a new key and revokes the old ones.
"""

from __future__ import annotations

import re
from pathlib import Path

from shoal.config import SITE_NAME, ConfigError
from shoal.federated import certs

CA_NAME = "Shoal sites CA"


def make_site_certs(folder: Path, sites: list[str], hosts: tuple[str, ...] = (),
                    reissue: tuple[str, ...] = ()) -> list[tuple[Path, str]]:
    """CA (kept if present) and one certificate per site; returns (file, what happened) pairs."""
    names = list(dict.fromkeys(sites + [n for n in reissue if n not in sites]))
    if not names:
        raise ConfigError("--sites is empty: name the sites, e.g. --sites a,b,c")
    for name in names:
        if not re.match(SITE_NAME, name):
            raise ConfigError(f"--sites: '{name}' must be letters, digits, '.', '_' or '-'")
    if not (folder / "ca.key").is_file():
        certs.make_ca(folder, CA_NAME)
    done = [(folder / "ca.pem", "CA")]
    for name in names:
        path = folder / f"{name}.pem"
        if path.is_file() and name not in reissue:
            done.append((path, f"kept (already issued; --reissue {name} replaces it)"))
            continue
        old = certs.serials_of(folder, name)
        certs.issue(folder, name, peer=True, hosts=hosts)
        if old:
            certs.write_crl(folder, sorted(certs.revoked_serials(folder) | old))
            done.append((path, f"re-issued; {len(old)} earlier certificate(s) of '{name}' revoked in crl.pem"))
        else:
            done.append((path, "issued"))
    return done


def revoke_site(folder: Path, name: str) -> list[int]:
    """Revoke every certificate issued to site `name`; returns their serial numbers."""
    return certs.revoke(folder, name)
