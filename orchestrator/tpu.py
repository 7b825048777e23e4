"""TPU slices: `tpu_type` (v4-16) or accelerator type + topology, to Ray Train's scaling.

Chip counts, chips per host and hosts per slice come from Ray's own TPU helpers, so a
slice is sized the way Ray's scheduler and autoscaler size it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re

from ray._private.accelerators.tpu import VALID_TPU_TOPOLOGY, get_tpu_cores_per_chip
from ray.util.tpu import get_tpu_version_from_type, get_tpu_worker_resources

from raysft.workers.runtime.chips import Chip, tpu_chip

_TPU_TYPE = re.compile(r"^(v\d+[a-z]*)-(\d+)$")
# What people call a generation where GCP's type name differs (v5e-16 is v5litepod-16).
_ALIASES = {"v5e": "v5litepod"}
_NAMES = {v: a for a, v in _ALIASES.items()}


class CompilerUnavailable(ValueError):
    """libtpu, which compiles for TPU slices on any machine, is not installed here."""


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

    @property
    def chips(self) -> int:
        return self.chips_per_host * self.num_workers

    @property
    def chip(self) -> Chip:
        """The chip's figures (peak FLOP/s, HBM)."""
        return tpu_chip(self.accelerator_type.removeprefix("TPU-"))

    def compile_devices(self) -> list:
        """The slices' devices as libtpu describes them, to compile for without a TPU."""
        if importlib.util.find_spec("libtpu") is None:
            import jax

            raise CompilerUnavailable(
                "compiling for a TPU slice needs libtpu on this machine: "
                f"pip install 'raysft[tpu]' (or 'jax[tpu]=={jax.__version__}')"
            )
        from jax.experimental import topologies

        chip = self.chip
        bounds = {1: (1, 1, 1), 2: (1, 2, 1), 4: (2, 2, 1), 8: (2, 4, 1)}[self.chips_per_host]
        options = dict(chips_per_host_bounds=bounds)
        if chip.megacore:
            options["chip_config_name"] = "megacore"
        if self.num_slices > 1:
            options["num_slices"] = self.num_slices
        with _compile_only_libtpu(self.tpu_type):
            return topologies.get_topology_desc(
                topology_name=f"{chip.topology_name}:{self.topology}", platform="tpu", **options
            ).devices


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


@contextlib.contextmanager
def _compile_only_libtpu(tpu_type: str):
    """The environment libtpu reads once, when it loads, set for compiling only and put
    back after (processes this one starts later, such as an embedded Ray's workers on a
    TPU VM, must see the machine's own).

    Off a TPU VM there is nothing to describe "this machine" from: say so instead of
    letting libtpu probe and warn. Its compiler logs every pass into /tmp/tpu_logs,
    which Ray's log monitor streams to the driver's console, and a program that does not
    fit as a 200-line report on stderr: the plan reports memory itself, so fatal errors
    only (TPU_STDERR_LOG_LEVEL=0 brings libtpu's own report back).
    And it takes a machine-wide lock that would keep a training worker on this host (a
    one-host slice) off the TPU: compiling needs no TPU, so no lock."""
    wanted = {
        "TPU_ACCELERATOR_TYPE": tpu_type, "TPU_WORKER_HOSTNAMES": "localhost", "TPU_SKIP_MDS_QUERY": "1",
        "TPU_MIN_LOG_LEVEL": "3", "TPU_STDERR_LOG_LEVEL": "3", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    }
    before = {name: os.environ.get(name) for name in wanted}
    os.environ.update({name: value for name, value in wanted.items() if before[name] is None})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)


def _chips(topology: str) -> int:
    return math.prod(int(d) for d in topology.split("x"))


def _sorted_topologies(version: str) -> list[str]:
    return sorted(VALID_TPU_TOPOLOGY[version], key=lambda t: (_chips(t), t))


def _parse_tpu_type(tpu_type: str) -> tuple[str, str]:
    """v4-16 -> (v4, 2x2x2): the number counts TensorCores (two per chip on v2-v5p)."""
    match = _TPU_TYPE.match(tpu_type.strip().lower())
    if not match:
        raise ValueError(f"tpu_type {tpu_type!r}: expected <generation>-<cores>, e.g. v4-16, v5litepod-16, v6e-8")
    version, cores = _ALIASES.get(match[1], match[1]), int(match[2])
    try:
        get_tpu_version_from_type(version)
    except ValueError:
        known = ", ".join(f"{v} ({a})" if a else v for v, a in ((v, _NAMES.get(v)) for v in VALID_TPU_TOPOLOGY))
        raise ValueError(f"tpu_type {tpu_type!r}: unknown TPU generation {match[1]!r}; known: {known}") from None
    per_chip = get_tpu_cores_per_chip(version)
    chips, rest = divmod(cores, per_chip)
    # The most compact shape of that many chips: GCP's default topology for the type.
    shapes = [t for t in _sorted_topologies(version) if _chips(t) == chips]
    if rest or not shapes:
        sizes = sorted({_chips(t) * per_chip for t in VALID_TPU_TOPOLOGY[version]})
        raise ValueError(f"tpu_type {tpu_type!r}: {version} slices have {', '.join(map(str, sizes))} cores")
    return version, min(shapes, key=lambda t: (max(int(d) for d in t.split("x")), t))
