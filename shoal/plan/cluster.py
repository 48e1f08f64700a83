"""Clusters described by their specs: `shoal plan CONFIG --world N --cluster FILE|PRESET`.

A cluster file is TOML:

    accelerator = "H100 SXM"
    peak_tflops = { bf16 = 989, fp32 = 67 }   # dense, per accelerator, from the spec sheet
    hbm_gb = 80                                # memory per accelerator
    hbm_bandwidth_gbps = 3350                  # GB/s
    per_node = 8                               # accelerators per node
    intra_node_gbps = 450                      # GB/s per accelerator inside a node (NVLink)
    intra_node_latency_us = 3
    inter_node_gbps = 50                       # GB/s per accelerator between nodes (400 Gb/s NIC)
    inter_node_latency_us = 10
    dollars_per_hour = 3.0                     # per accelerator, on demand
    spot_dollars_per_hour = 1.5
    spot_preemptions_per_hour = 0.05           # per node
    efficiency = 0.45                          # share of peak reached; calibrate on one node

The presets shipped here (`--cluster h100-sxm`, `h200`, `a100`, `l4`) come from the vendors'
published specs and typical cloud list prices; they are not measurements. Every row they
produce is labelled "spec-only" until a run on that hardware replaces the efficiency.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from shoal.config import ConfigError
from shoal.plan.hardware import Accelerators

REQUIRED = ("accelerator", "peak_tflops", "hbm_gb", "hbm_bandwidth_gbps", "per_node", "intra_node_gbps",
            "intra_node_latency_us", "inter_node_gbps", "inter_node_latency_us", "dollars_per_hour")
OPTIONAL = ("spot_dollars_per_hour", "spot_preemptions_per_hour", "efficiency", "measured")

# Dense tensor-core peaks and memory from NVIDIA's data sheets; prices are typical on-demand
# and spot list prices per GPU-hour (late 2025), a starting point to overwrite with a quote.
PRESETS: dict[str, dict] = {
    "h100-sxm": {"accelerator": "H100 SXM 80GB", "peak_tflops": {"bf16": 989, "fp16": 989, "fp32": 67},
                 "hbm_gb": 80, "hbm_bandwidth_gbps": 3350, "per_node": 8, "intra_node_gbps": 450,
                 "intra_node_latency_us": 3, "inter_node_gbps": 50, "inter_node_latency_us": 10,
                 "dollars_per_hour": 3.0, "spot_dollars_per_hour": 1.6, "spot_preemptions_per_hour": 0.05,
                 "efficiency": 0.45},
    "h200": {"accelerator": "H200 SXM 141GB", "peak_tflops": {"bf16": 989, "fp16": 989, "fp32": 67},
             "hbm_gb": 141, "hbm_bandwidth_gbps": 4800, "per_node": 8, "intra_node_gbps": 450,
             "intra_node_latency_us": 3, "inter_node_gbps": 50, "inter_node_latency_us": 10,
             "dollars_per_hour": 3.8, "spot_dollars_per_hour": 2.0, "spot_preemptions_per_hour": 0.05,
             "efficiency": 0.45},
    "a100": {"accelerator": "A100 SXM 80GB", "peak_tflops": {"bf16": 312, "fp16": 312, "fp32": 19.5},
             "hbm_gb": 80, "hbm_bandwidth_gbps": 2039, "per_node": 8, "intra_node_gbps": 300,
             "intra_node_latency_us": 3, "inter_node_gbps": 25, "inter_node_latency_us": 10,
             "dollars_per_hour": 1.8, "spot_dollars_per_hour": 0.9, "spot_preemptions_per_hour": 0.05,
             "efficiency": 0.5},
    "l4": {"accelerator": "L4 24GB", "peak_tflops": {"bf16": 121, "fp16": 121, "fp32": 30},
           "hbm_gb": 24, "hbm_bandwidth_gbps": 300, "per_node": 8, "intra_node_gbps": 32,
           "intra_node_latency_us": 8, "inter_node_gbps": 12.5, "inter_node_latency_us": 15,
           "dollars_per_hour": 0.8, "spot_dollars_per_hour": 0.35, "spot_preemptions_per_hour": 0.1,
           "efficiency": 0.4},
}


@dataclass(frozen=True)
class Cluster:
    name: str
    accelerator: str
    peak_flops: dict[str, float]
    hbm_bytes: float
    per_node: int
    hardware_fields: dict
    dollars_per_hour: float
    spot_dollars_per_hour: float | None
    spot_preemptions_per_hour: float
    efficiency: float
    spec_only: bool = True

    def hardware(self, precision: str) -> Accelerators:
        dtype = "bf16" if precision == "bf16" else "fp32"
        if dtype not in self.peak_flops:
            raise ConfigError(f"cluster {self.name}: peak_tflops has no '{dtype}' entry for "
                              f"train.precision = {precision!r}; add {dtype} = <TFLOP/s>")
        f = self.hardware_fields
        return Accelerators(peak_flops=self.peak_flops[dtype], memory_bandwidth=f["hbm_bandwidth_gbps"] * 1e9,
                            efficiency=self.efficiency, per_node=self.per_node,
                            intra_bandwidth=f["intra_node_gbps"] * 1e9, intra_latency=f["intra_node_latency_us"] * 1e-6,
                            inter_bandwidth=f["inter_node_gbps"] * 1e9, inter_latency=f["inter_node_latency_us"] * 1e-6)


def _is_number(value) -> bool:
    """An int or float from TOML; `true` is an int to Python, not a number in a cluster file."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_cluster(values: dict, name: str) -> Cluster:
    """A Cluster from a TOML table; a missing or impossible field is one ConfigError naming it."""
    unknown = sorted(set(values) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        tables = [k for k in unknown if isinstance(values[k], dict)]
        hint = (f" (the fields go at the top of the file, not under [{tables[0]}])" if tables and len(values) == 1
                else f"; the fields are {', '.join(REQUIRED + OPTIONAL)}")
        raise ConfigError(f"cluster {name}: unknown field {', '.join(repr(k) for k in unknown)}{hint}")
    for key in REQUIRED:
        if key not in values:
            raise ConfigError(f"cluster {name}: missing field '{key}' (see docs/plan.md for the format)")
    peaks = values["peak_tflops"]
    if not isinstance(peaks, dict) or not peaks:
        raise ConfigError(f"cluster {name}: peak_tflops must be a table like {{ bf16 = 989, fp32 = 67 }}")
    for key in REQUIRED[2:]:
        value = values[key]
        if not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"cluster {name}: {key} = {value!r} must be a positive number")
    for dtype, tflops in peaks.items():
        if not isinstance(tflops, (int, float)) or tflops <= 0:
            raise ConfigError(f"cluster {name}: peak_tflops.{dtype} = {tflops!r} must be a positive number")
    for key in ("spot_dollars_per_hour", "spot_preemptions_per_hour"):
        value = values.get(key, 0)
        if not _is_number(value) or value < 0:
            raise ConfigError(f"cluster {name}: {key} = {value!r} must be a number, 0 or more")
    if not isinstance(values.get("measured", False), bool):
        raise ConfigError(f"cluster {name}: measured = {values['measured']!r} must be true or false")
    efficiency = values.get("efficiency", 0.45)
    if not _is_number(efficiency) or not 0 < efficiency <= 1:
        raise ConfigError(f"cluster {name}: efficiency = {efficiency!r} must be in (0, 1]")
    if int(values["per_node"]) != values["per_node"]:
        raise ConfigError(f"cluster {name}: per_node = {values['per_node']!r} must be a whole number")
    return Cluster(name=name, accelerator=str(values["accelerator"]),
                   peak_flops={k: v * 1e12 for k, v in peaks.items()}, hbm_bytes=values["hbm_gb"] * 1e9,
                   per_node=int(values["per_node"]), hardware_fields=values,
                   dollars_per_hour=float(values["dollars_per_hour"]),
                   spot_dollars_per_hour=values.get("spot_dollars_per_hour"),
                   spot_preemptions_per_hour=float(values.get("spot_preemptions_per_hour", 0.0)),
                   efficiency=float(efficiency), spec_only=not values.get("measured", False))


def load_cluster(spec: str) -> Cluster:
    """A preset name (h100-sxm, h200, a100, l4) or a TOML file."""
    if spec in PRESETS:
        return parse_cluster(PRESETS[spec], spec)
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"--cluster {spec!r}: no such file and not a preset ({', '.join(PRESETS)})")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--cluster {spec}: not valid TOML ({err})") from None
    return parse_cluster(values, spec)


def check_world(cluster: Cluster, world: int) -> None:
    """A world the cluster can be: whole nodes, or part of one."""
    if world > cluster.per_node and world % cluster.per_node:
        raise ConfigError(f"--world {world} on {cluster.name}: {cluster.per_node} accelerators per node, so a "
                          f"world above one node must be a multiple of {cluster.per_node}")


@dataclass(frozen=True)
class RunCost:
    hours: float
    dollars: float
    dollars_per_billion_tokens: float
    spot_dollars: float | None


def run_cost(cluster: Cluster, world: int, tokens_per_second: float, token_budget: float,
             spot_goodput: float = 1.0) -> RunCost:
    """Wall time and dollars to train `token_budget` tokens on `world` accelerators; on spot
    capacity the hours stretch by 1/goodput (work lost to preemptions)."""
    hours = token_budget / tokens_per_second / 3600
    per_hour = world * cluster.dollars_per_hour
    spot = (hours / spot_goodput * world * cluster.spot_dollars_per_hour
            if cluster.spot_dollars_per_hour else None)
    return RunCost(hours=hours, dollars=hours * per_hour,
                   dollars_per_billion_tokens=per_hour / (tokens_per_second * 3600) * 1e9, spot_dollars=spot)
