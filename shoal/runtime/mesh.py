"""ParallelDims: the parallel degrees, checked once, and the named DeviceMesh they build.

Axes, outermost first: pp, dp_replicate, dp_shard, tp. tp is innermost so tensor-parallel
peers are neighbours (same host when there are several); the data-parallel axes are named
so FSDP can take ("dp_replicate", "dp_shard") for HSDP and fault tolerance can drop one
replica group.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from shoal.config import ConfigError, ParallelConfig


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world_size: int

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> "ParallelDims":
        """Resolve the -1 ("fill") degrees and check the product is the world size."""
        degrees = {"dp_replicate": cfg.dp_replicate, "dp_shard": cfg.dp_shard, "tp": cfg.tp, "pp": cfg.pp}
        fill = [name for name, d in degrees.items() if d == -1]
        for name, d in degrees.items():
            if d == 0:
                raise ConfigError(f"parallel.{name} = 0 is not a degree; use 1 to disable it or -1 to fill")
        if len(fill) > 1:
            # dp_replicate fills by default; a user asking dp_shard = -1 means "shard over the rest"
            if "dp_shard" in fill:
                degrees["dp_replicate"] = 1
                fill.remove("dp_replicate")
            else:
                raise ConfigError(f"only one of parallel.{', parallel.'.join(fill)} may be -1")
        fixed = 1
        for name, d in degrees.items():
            if d != -1:
                fixed *= d
        if fill:
            if world_size % fixed:
                raise ConfigError(f"the world of {world_size} ranks does not split by the fixed degrees "
                                  f"({_describe(degrees)} = {fixed}); choose degrees whose product divides it")
            degrees[fill[0]] = world_size // fixed
        product = degrees["dp_replicate"] * degrees["dp_shard"] * degrees["tp"] * degrees["pp"]
        if product != world_size:
            raise ConfigError(f"parallel degrees {_describe(degrees)} multiply to {product}, but the world has "
                              f"{world_size} ranks (launch.nproc x hosts); set one degree to -1 to fill")
        return cls(world_size=world_size, **degrees)

    @property
    def dp(self) -> int:
        """Ranks that see different data."""
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str) -> DeviceMesh:
        names = ("pp", "dp_replicate", "dp_shard", "tp")
        shape = tuple(getattr(self, n) for n in names)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
        mesh[("dp_replicate", "dp_shard")]._flatten("dp")  # one group for "all ranks with different data"
        return mesh


def _describe(degrees: dict[str, int]) -> str:
    return " x ".join(f"{name}={d}" for name, d in degrees.items())
