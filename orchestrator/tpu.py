"""TPU slices: `tpu_type` (v4-16) or accelerator type + topology, to Ray Train's scaling.

Chip counts, chips per host and hosts per slice come from Ray's own TPU helpers, so a
slice is sized the way Ray's scheduler and autoscaler size it.
"""

from __future__ import annotations

import dataclasses
import math
import re

from ray._private.accelerators.tpu import VALID_TPU_TOPOLOGY, get_tpu_cores_per_chip
from ray.util.tpu import get_tpu_version_from_type, get_tpu_worker_resources

_TPU_TYPE = re.compile(r"^(v\d+[a-z]*)-(\d+)$")


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    tpu_type: str  # v4-16
    accelerator_type: str  # TPU-V4, as Ray labels the nodes
    topology: str  # 2x2x2
    num_slices: int
    num_workers: int  # hosts per slice x slices: one Ray Train worker per host
    resources_per_worker: dict[str, float]

    @property
    def hosts_per_slice(self) -> int:
        return self.num_workers // self.num_slices

    @property
    def chips_per_host(self) -> int:
        return int(self.resources_per_worker["TPU"])

    @classmethod
    def resolve(
        cls, tpu_type: str | None, accelerator_type: str | None, topology: str | None, num_slices: int = 1
    ) -> "TpuSlice":
        if tpu_type and (accelerator_type or topology):
            raise ValueError("set tpu_type, or accelerator_type with topology, not both")
        if tpu_type:
            version, topology = _parse_tpu_type(tpu_type)
        elif accelerator_type and topology:
            version = get_tpu_version_from_type(accelerator_type)
            if topology not in VALID_TPU_TOPOLOGY[version]:
                raise ValueError(
                    f"topology {topology!r} is not a {version} topology; one of {_sorted_topologies(version)}"
                )
        else:
            raise ValueError("a TPU run needs tpu_type (e.g. v4-16), or accelerator_type (e.g. TPU-V4) with topology")
        accelerator = f"TPU-{version.upper()}"
        workers, resources = get_tpu_worker_resources(topology, accelerator, num_slices=num_slices)
        cores = _chips(topology) * get_tpu_cores_per_chip(version)
        return cls(f"{version}-{cores}", accelerator, topology, num_slices, workers, resources)


def _chips(topology: str) -> int:
    return math.prod(int(d) for d in topology.split("x"))


def _sorted_topologies(version: str) -> list[str]:
    return sorted(VALID_TPU_TOPOLOGY[version], key=lambda t: (_chips(t), t))


def _parse_tpu_type(tpu_type: str) -> tuple[str, str]:
    """v4-16 -> (v4, 2x2x2): the number counts TensorCores (two per chip on v2-v5p)."""
    match = _TPU_TYPE.match(tpu_type.strip().lower())
    if not match:
        raise ValueError(f"tpu_type {tpu_type!r}: expected <generation>-<cores>, e.g. v4-16, v5litepod-16, v6e-8")
    version, cores = match[1], int(match[2])
    get_tpu_version_from_type(version)  # names the valid generations
    per_chip = get_tpu_cores_per_chip(version)
    chips, rest = divmod(cores, per_chip)
    # The most compact shape of that many chips: GCP's default topology for the type.
    shapes = [t for t in _sorted_topologies(version) if _chips(t) == chips]
    if rest or not shapes:
        sizes = sorted({_chips(t) * per_chip for t in VALID_TPU_TOPOLOGY[version]})
        raise ValueError(f"tpu_type {tpu_type!r}: {version} slices have {', '.join(map(str, sizes))} cores")
    return version, min(shapes, key=lambda t: (max(int(d) for d in t.split("x")), t))
