"""`shoal fed server|client|certs|simulate`: argparse wiring only; the work happens in the handlers.

Importing this module is cheap: grpc, torch and opacus are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from shoal.config import ConfigError

OVERRIDE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*=")


class OverridesParser(argparse.ArgumentParser):
    """A subcommand parser that takes `section.key=value` overrides anywhere on the line.

    argparse fills the positional `overrides` only from the words right after CONFIG, and
    `parse_intermixed_args` cannot run under subparsers; so the words it leaves over that look
    like overrides (`a.b=c`, not an option) join `overrides` in the order typed.
    """

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        if hasattr(namespace, "overrides"):
            late = [a for a in extras if OVERRIDE_RE.match(a)]
            namespace.overrides = list(namespace.overrides or []) + late
            extras = [a for a in extras if not OVERRIDE_RE.match(a)]
        return namespace, extras


def register(subparsers: argparse._SubParsersAction) -> None:
    fed = subparsers.add_parser("fed", help="federated training: server, client, certificates, simulation")
    commands = fed.add_subparsers(dest="fed_command", required=True, metavar="{server,client,certs,simulate}",
                                  parser_class=OverridesParser)

    server = commands.add_parser("server", help="run the federated server (mutual TLS gRPC)")
    server.add_argument("config", help="TOML config with a [federated] section")
    server.add_argument("overrides", nargs="*", help="section.key=value overrides")
    server.set_defaults(func=cmd_server)

    client = commands.add_parser("client", help="run one federated client on local data")
    client.add_argument("config", help="TOML config (the same file as the server's)")
    client.add_argument("overrides", nargs="*", help="section.key=value overrides")
    client.add_argument("--data", required=True, help="folder with x.npy (features) and y.npy (labels)")
    client.add_argument("--server", required=True, help="HOST:PORT of the server")
    client.add_argument("--name", required=True, help="this site's name: its certificate is <certs_dir>/NAME.pem")
    client.add_argument("--audit-dir", default="", help="keep a copy of every update sent, for audit")

    client.set_defaults(func=cmd_client)

    certs = commands.add_parser("certs", help="make a CA, a server certificate and client certificates")
    certs.add_argument("--out", default="certs", help="folder for the certificates (default: certs)")
    certs.add_argument("--clients", default="", help="comma-separated client names, e.g. hospital1,hospital2")
    certs.add_argument("--hosts", default="localhost,127.0.0.1", help="server host names and IPs for its certificate")
    certs.add_argument("--revoke", default="", help="revoke every certificate ever issued to this name (crl.pem)")
    certs.add_argument("--reissue", default="",
                       help="comma-separated names ('server' too) whose certificates are replaced, the old ones revoked")
    certs.set_defaults(func=cmd_certs)

    simulate = commands.add_parser("simulate", help="simulate many clients on this machine in a bounded pool")
    simulate.add_argument("config", help="TOML config with a [federated] section")
    simulate.add_argument("overrides", nargs="*", help="section.key=value overrides")
    simulate.add_argument("--clients", type=int, default=0, help="virtual clients (default: federated.sim_clients)")
    simulate.add_argument("--workers", type=int, default=0, help="worker processes (default: federated.sim_workers)")
    simulate.set_defaults(func=cmd_simulate)


def _setup_logging(run_dir: Path | None, name: str) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / f"{name}.log"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _run_dir(cfg) -> Path:
    from shoal.config import to_toml

    run_dir = Path(cfg.log.dir) / cfg.log.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    return run_dir


def cmd_server(args: argparse.Namespace) -> int:
    from shoal.config import load

    cfg = load(args.config, args.overrides)
    run_dir = _run_dir(cfg)
    _setup_logging(run_dir, "server")
    from shoal.federated.grpclog import log_tls_refusals

    log_tls_refusals()
    from shoal.federated.rounds import check_federated
    from shoal.federated.server import serve

    check_federated(cfg)
    final = serve(cfg, run_dir)
    print("final: " + ", ".join(f"{k}={v:.4f}" for k, v in final.items()))
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from shoal.config import load
    from shoal.federated.client import FederatedClient

    cfg = load(args.config, args.overrides)
    _setup_logging(None, args.name)
    logging.getLogger().handlers[0].setFormatter(
        logging.Formatter(f"%(asctime)s client {args.name} %(levelname)s %(message)s"))
    client = FederatedClient(cfg, args.data, args.server, args.name,
                             Path(args.audit_dir) if args.audit_dir else None)
    return client.run(cfg.federated.join_timeout)


def cmd_certs(args: argparse.Namespace) -> int:
    from shoal.federated import certs

    out = Path(args.out)
    if args.revoke:
        serials = certs.revoke(out, args.revoke)
        print(f"revoked every certificate issued to {args.revoke} (serials {', '.join(f'{s:x}' for s in serials)}); "
              f"{out / 'crl.pem'} updated")
        return 0
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    hosts = tuple(h.strip() for h in args.hosts.split(",") if h.strip())
    reissue = tuple(n.strip() for n in args.reissue.split(",") if n.strip())
    for path, what in certs.make_all(out, clients, hosts, reissue=reissue):
        print(f"{path}: {what}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from shoal.config import load

    cfg = load(args.config, args.overrides)  # before the heavy imports: bad input fails fast
    if args.clients < 0 or args.workers < 0:
        raise ConfigError("--clients and --workers must be positive")
    from shoal.federated.simulate import simulate

    if args.clients:
        cfg.federated.sim_clients = args.clients
    if args.workers:
        cfg.federated.sim_workers = args.workers
    run_dir = _run_dir(cfg)
    _setup_logging(run_dir, "simulate")
    result = simulate(cfg, run_dir)
    print("final: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in result.items() if not isinstance(v, list)))
    return 0
