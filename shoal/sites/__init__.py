"""Training across sites that trust no network between them (docs/sites.md).

A site is a set of workers on a network its owner trusts; inside it Gloo/NCCL run as usual. Between
sites only the cross-site plane runs, over mutual TLS 1.3 with the job's site certificates: DiLoCo's
outer average, which sites are in which outer round, and the state a joining site receives.

- certs.py: `shoal sites certs` (CA, one certificate per site, CRL), on shoal/federated/certs.py
- wire.py: TLS contexts (TLS 1.3 minimum, CRL checked in the handshake, fail closed) and frames
- plane.py: a site leader's links, the outer-round exchange with its grace window, joining
- sharded.py: the outer average of 3 sites or more as reduce-scatter + all-gather of shards
- lineage.py: which steps of each site an outer model holds, sent with it to a joining site
- outer.py: DiLoCo whose replicas are sites (`SitesDiLoCo`)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from shoal.config import Config, site_peers, split_endpoint

__all__ = ["site_index", "sites_outer_sync"]


def site_index(cfg: Config) -> tuple[int, int]:
    """(this site's place among all sites in name order, how many sites): the site's share of the data."""
    names = sorted([cfg.sites.name, *site_peers(cfg)])
    return names.index(cfg.sites.name), len(names)


def sites_outer_sync(cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path, *,
                     resumed: bool):
    """The DiLoCo context across sites for this worker; rank 0 of the site is its leader on the plane."""
    from shoal.sites.outer import SitesDiLoCo
    from shoal.sites.plane import SitePlane, event_writer
    from shoal.sites.wire import message_limits
    from shoal.sync.outer_settings import outer_options

    plane = None
    if dist.get_rank() == 0:
        num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        plane = SitePlane(name=cfg.sites.name, listen=split_endpoint("sites.listen", cfg.sites.listen),
                          peers=site_peers(cfg), certs_dir=Path(cfg.sites.certs),
                          grace_seconds=cfg.sites.grace_seconds, limit=message_limits(num_params),
                          events=event_writer(Path(run_dir) / "events.jsonl"))
    _, sites = site_index(cfg)
    return SitesDiLoCo(model, optimizer, plane=plane, join_timeout=cfg.sites.join_timeout, resumed=resumed,
                       samples_per_step=cfg.train.batch_size // sites,
                       group=dist.group.WORLD, **outer_options(cfg.sync, sites))
