"""The rules a config keeps beyond each field's own type: `validate` checks every field's allowed values
and range, then the rules that span fields, with those of [selfplay] (`validate_selfplay`) and
[sites] (`validate_sites`: site names, host:port endpoints, the peers list, no c10d port facing the
other sites). `load` (loading.py) calls `validate` on every config it returns. `per_step_unsupported`
says which layouts and sync methods per-step fault tolerance covers (the launcher and the planner ask).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from shoal.config.fields import ConfigError, _suggest
from shoal.config.schema import SECTIONS, Config
from shoal.config.training import COMPRESSION_HOOKS, OUTER_SYNC_METHODS


def validate(cfg: Config) -> None:
    """Check every field's allowed values and range, then the rules that span fields."""
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            value, meta = getattr(obj, f.name), f.metadata
            where = f"{section}.{f.name}"
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{where} = {value} must be a finite number")
            if meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(f"{where} = {value!r} is not one of {', '.join(map(str, meta['choices']))}"
                                  f"{_suggest(str(value), list(meta['choices'])) if isinstance(value, str) else ''}")
            if meta.get("min") is not None and value < meta["min"]:
                raise ConfigError(f"{where} = {value} is below its minimum {meta['min']}")
            if meta.get("max") is not None and value > meta["max"]:
                raise ConfigError(f"{where} = {value} is above its maximum {meta['max']}")
    if cfg.model.factory and ":" not in cfg.model.factory:
        raise ConfigError(f"model.factory = '{cfg.model.factory}' must look like 'package.module:function'")
    if cfg.model.loss and cfg.model.loss != "model" and ":" not in cfg.model.loss:
        raise ConfigError(f"model.loss = '{cfg.model.loss}' must be 'model' or look like 'package.module:function'")
    if cfg.model.hf and cfg.model.factory:
        raise ConfigError("model.hf and model.factory are both set; keep one")
    if any(not isinstance(name, str) for name in cfg.parallel.shard_modules):
        raise ConfigError(f"parallel.shard_modules = {cfg.parallel.shard_modules!r} must be a list of class names")
    for key in ("factory", "collate"):
        value = getattr(cfg.data, key)
        if value and ":" not in value:
            raise ConfigError(f"data.{key} = '{value}' must look like 'package.module:function'")
    if cfg.data.source in ("text", "npy", "shards", "arrow", "parquet", "images") and not cfg.data.path \
            and not cfg.data.factory:
        raise ConfigError(f"data.path is required when data.source = '{cfg.data.source}'")
    if cfg.data.source in ("text", "npy", "shards", "arrow", "parquet", "images") and not cfg.data.factory:
        for part in cfg.data.path.split(","):
            if not Path(part).exists():
                raise ConfigError(f"data.path: {part} does not exist")
    sync = cfg.sync
    outer = sync.method in OUTER_SYNC_METHODS
    if sync.method != "diloco" and (sync.compression not in ("auto", "none") or sync.fragments > 1
                                    or sync.overlap):
        raise ConfigError(f"sync.compression, sync.fragments and sync.overlap apply only to sync.method = "
                          f"'diloco', not '{sync.method}'")
    if sync.outer_momentum >= 1 or -1 < sync.outer_momentum < 0:
        raise ConfigError(f"sync.outer_momentum = {sync.outer_momentum} must be in [0, 1), or -1 for the tuned "
                          f"value: at 1 the outer momentum never decays and the outer step grows without bound")
    if not 0 < sync.topk_fraction <= 1:
        raise ConfigError(f"sync.topk_fraction = {sync.topk_fraction} must be in (0, 1]: the share of each "
                          f"chunk's values sent (0.02 sends 2 %)")
    if sync.compression != "topk" and (sync.topk_fraction != 0.02 or sync.topk_bits != 2):
        raise ConfigError(f"sync.topk_fraction and sync.topk_bits apply only to sync.compression = 'topk', "
                          f"not '{sync.compression}'")
    if sync.fragments > sync.inner_steps:
        raise ConfigError(f"sync.fragments = {sync.fragments} must be at most sync.inner_steps = "
                          f"{sync.inner_steps}: each fragment syncs once per outer round")
    if cfg.sites.name:
        validate_sites(cfg)
    elif outer and cfg.parallel.dp_replicate == 1:
        raise ConfigError(f"sync.method = '{sync.method}' averages over the parallel.dp_replicate axis, "
                          f"but parallel.dp_replicate = 1 leaves nothing to average over")
    if cfg.selfplay.game:
        validate_selfplay(cfg)
    if sync.method in COMPRESSION_HOOKS and cfg.parallel.dp_shard != 1:
        raise ConfigError(f"sync.method = '{sync.method}' is a DDP comm hook and needs parallel.dp_shard = 1 "
                          f"(FSDP has no comm hooks)")


def validate_selfplay(cfg: Config) -> None:
    """The [selfplay] rules that span fields (the game's name is checked against shoal/selfplay/games/ when a
    run starts, since shoal.config imports no other part of the package)."""
    sp = cfg.selfplay
    if not re.match(r"^[a-z][a-z0-9_]*$", sp.game):
        raise ConfigError(f"selfplay.game = '{sp.game}' must be a module name of shoal/selfplay/games/, "
                          f"e.g. 'connect4'")
    sims = [int(n) if isinstance(n, str) and n.strip().isdigit() else n for n in sp.eval_mcts_simulations]
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sims):
        raise ConfigError(f"selfplay.eval_mcts_simulations = {sims!r} must be a list of positive simulation "
                          f"counts, e.g. [200, 1000]")
    sp.eval_mcts_simulations = sims  # `key=200,1000` on the command line arrives as strings
    if sp.eval_games % 2:
        raise ConfigError(f"selfplay.eval_games = {sp.eval_games} must be even: half the games with each colour")
    if sp.batch_size % cfg.launch.nproc:
        raise ConfigError(f"selfplay.batch_size = {sp.batch_size} must divide among the launch.nproc = "
                          f"{cfg.launch.nproc} learner ranks")
    if cfg.parallel.tp != 1 or cfg.parallel.pp != 1 or cfg.parallel.dp_shard != 1:
        raise ConfigError("parallel: the self-play learner is data parallel only (DDP over launch.nproc ranks); "
                          "leave parallel.tp, parallel.pp and parallel.dp_shard at 1")
    if cfg.sync.method != "allreduce" or cfg.sites.name:
        raise ConfigError(f"sync.method = '{cfg.sync.method}': the self-play learner averages gradients every "
                          f"step (sync.method = 'allreduce', no sites)")


SITE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""A site's name: also its certificate's common name (shoal/federated/certs.py's NAME_RE)."""
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def split_endpoint(where: str, value: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') as (host, port); ConfigError naming `where` otherwise."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where} = '{value}' must look like host:port (e.g. 10.0.0.1:7443)")
    return host, int(port)


def site_peers(cfg: Config) -> dict[str, tuple[str, int]]:
    """sites.peers as {name: (host, port)}, checked."""
    peers: dict[str, tuple[str, int]] = {}
    for item in cfg.sites.peers:
        name, sep, endpoint = str(item).partition("=")
        if not sep or not re.match(SITE_NAME, name.strip()):
            raise ConfigError(f"sites.peers entry '{item}' must look like name=host:port with a site name of "
                              f"letters, digits, '.', '_' or '-'")
        name = name.strip()
        if name == cfg.sites.name or name in peers:
            raise ConfigError(f"sites.peers names '{name}' twice (or this site itself); each other site once")
        peers[name] = split_endpoint(f"sites.peers[{name}]", endpoint.strip())
    return peers


def validate_sites(cfg: Config) -> None:
    """The [sites] rules: names, endpoints, DiLoCo as the only thing crossing, and no c10d/Gloo port facing
    the other sites."""
    sites = cfg.sites
    if not re.match(SITE_NAME, sites.name):
        raise ConfigError(f"sites.name = '{sites.name}' must be letters, digits, '.', '_' or '-' (its certificate's name)")
    listen_host, _ = split_endpoint("sites.listen", sites.listen)
    peers = site_peers(cfg)
    if not peers:
        raise ConfigError("sites.peers is empty: list the other sites as [\"name=host:port\"]")
    if not sites.certs:
        raise ConfigError("sites.certs is empty: the folder `shoal sites certs --out DIR` wrote")
    if sites.internal in ("", "0.0.0.0", "::", "*"):
        raise ConfigError(f"sites.internal = '{sites.internal}' would open the site's c10d store and Gloo on every "
                          f"interface, the other sites' side included; give loopback or the site's own network")
    if sites.internal == listen_host and listen_host not in LOOPBACK:
        raise ConfigError(f"sites.internal = '{sites.internal}' is the address the other sites reach (sites.listen); "
                          f"the c10d store and Gloo must use the site's own network")
    if sites.internal in {host for host, _ in peers.values()} and sites.internal not in LOOPBACK:
        raise ConfigError(f"sites.internal = '{sites.internal}' is another site's address (sites.peers)")
    if cfg.sync.method != "diloco":
        raise ConfigError(f"sync.method = '{cfg.sync.method}': between sites only DiLoCo's outer sync crosses; "
                          f"set sync.method = 'diloco'")
    if cfg.sync.fragments != 1 or cfg.sync.overlap:
        raise ConfigError("sync.fragments and sync.overlap: sites sync the whole model at once (fragments = 1, "
                          "overlap = false)")
    if cfg.sync.compression not in ("auto", "none", "fp4", "topk"):
        raise ConfigError(f"sync.compression = '{cfg.sync.compression}' is a collective of its own; between sites "
                          f"the outer gradient travels as 'none' (fp32), 'fp4' or 'topk'")
    if cfg.fault.enabled:
        raise ConfigError("fault.enabled: per-step fault tolerance inside a site is not combined with sites yet; "
                          "a lost site is dropped after sites.grace_seconds")


def replica_group_size(cfg: Config) -> int:
    """Workers per replica under per-step fault tolerance: parallel.dp_shard, whose workers
    shard one full copy of the model (1: every worker is a whole replica)."""
    return max(1, cfg.parallel.dp_shard)


def per_step_unsupported(cfg: Config) -> str:
    """Why this config cannot run per-step fault tolerance ('' when it can)."""
    p, nproc = cfg.parallel, cfg.launch.nproc
    shard = p.dp_shard
    replicas = nproc // shard if shard > 0 and nproc % shard == 0 else 0
    if p.tp != 1 or p.pp != 1 or shard == -1 or (shard > 1 and (replicas < 2 or p.dp_replicate not in (-1, replicas))):
        return (f"the layout (dp_replicate={p.dp_replicate}, dp_shard={shard}, tp={p.tp}, pp={p.pp}) over "
                f"{nproc} workers has no replica to drop (per-step recovery needs whole replicas, or "
                f"dp_replicate >= 2 replica groups of dp_shard workers with tp = pp = 1)")
    sync = cfg.sync
    if sync.method == "diloco" and shard == 1:  # shoal/fault/outer.py: replicas meet at outer syncs
        if sync.fragments != 1 or sync.overlap:
            return (f"streaming DiLoCo (sync.fragments = {sync.fragments}, sync.overlap = {sync.overlap}) is not "
                    f"supported by per-step fault tolerance yet; use sync.fragments = 1 without overlap")
        return ""
    if sync.method != "allreduce":
        return f"sync.method = '{sync.method}' is not supported by per-step fault tolerance yet"
    return ""
