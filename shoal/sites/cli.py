"""`shoal sites certs`: argparse wiring only; the work happens in shoal/sites/certs.py."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    sites = subparsers.add_parser("sites", help="training across sites: certificates for the cross-site plane")
    commands = sites.add_subparsers(dest="sites_command", required=True, metavar="{certs}")
    certs = commands.add_parser("certs", help="make a CA and one certificate per site (mutual TLS between sites)")
    certs.add_argument("--out", default="site-certs", help="folder for the certificates (default: site-certs)")
    certs.add_argument("--sites", default="", help="comma-separated site names, e.g. a,b,c")
    certs.add_argument("--hosts", default="localhost,127.0.0.1",
                       help="host names and IPs the sites listen on (put in every site's certificate)")
    certs.add_argument("--revoke", default="", help="revoke every certificate ever issued to this site (crl.pem)")
    certs.add_argument("--reissue", default="", help="comma-separated sites to give new certificates (old revoked)")
    certs.set_defaults(func=cmd_certs)


def cmd_certs(args: argparse.Namespace) -> int:
    from shoal.sites.certs import make_site_certs, revoke_site

    out = Path(args.out)
    if args.revoke:
        serials = revoke_site(out, args.revoke)
        print(f"revoked every certificate issued to site {args.revoke} (serials "
              f"{', '.join(f'{s:x}' for s in serials)}); {out / 'crl.pem'} updated: copy it to every site")
        return 0
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    hosts = tuple(h.strip() for h in args.hosts.split(",") if h.strip())
    reissue = tuple(n.strip() for n in args.reissue.split(",") if n.strip())
    for path, what in make_site_certs(out, sites, hosts, reissue):
        print(f"{path}: {what}")
    return 0
