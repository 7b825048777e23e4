"""Accelerator chips: peak bf16 FLOP/s and memory per chip, in one table.

Looked up by JAX's `device_kind` (MFU on the workers) or by a TPU generation as Ray and
GCP name it (`raysft plan`, which compiles for a slice that is not attached).
"""

from __future__ import annotations

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # as users say it: v5p, H100
    device_kinds: tuple[str, ...]  # JAX's device_kind prefixes, most specific first
    peak_flops: float  # dense bf16, per chip (vendor figures)
    hbm_bytes: int | None = None  # per chip; None where it varies by model (GPUs)
    # What the TPU compiler lets one program (one device) use: its "available HBM" in
    # libtpu 0.0.42, read from its refusal of a program too large.
    usable_hbm_bytes: int | None = None
    generations: tuple[str, ...] = ()  # Ray's / GCP's TPU version names
    topology_name: str | None = None  # libtpu's name in "v5p:2x2x2" compile-only topologies
    # libtpu describes the chip as one device (two TensorCores as one) only when asked.
    megacore: bool = False
    # JAX devices per chip: 2 where each TensorCore is a device with its own HBM (v2, v3, v7x).
    devices_per_chip: int = 1
    # What fp32 matmuls reach at JAX's default precision, where it differs from bf16:
    # TF32 tensor cores on GPUs (dense). TPUs run them as one bf16 pass at that precision.
    fp32_peak_flops: float | None = None

    @property
    def device_hbm_bytes(self) -> int | None:
        return self.hbm_bytes // self.devices_per_chip if self.hbm_bytes else None

    def __post_init__(self):
        if self.usable_hbm_bytes and self.usable_hbm_bytes > self.device_hbm_bytes:
            raise ValueError(f"{self.name}: usable HBM per device above the device's total")


CHIPS = (
    Chip("v2", ("TPU v2",), 45e12, 16 * GiB, int(7.48 * GiB), ("v2",), "v2", devices_per_chip=2),
    Chip("v3", ("TPU v3",), 123e12, 32 * GiB, int(15.48 * GiB), ("v3",), "v3", devices_per_chip=2),
    Chip("v4", ("TPU v4",), 275e12, 32 * GiB, int(30.75 * GiB), ("v4",), "v4", megacore=True),
    Chip("v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16 * GiB, int(15.75 * GiB), ("v5litepod", "v5e"), "v5e"),
    # 96 GiB of HBM2e (the "95 GiB" of some pages is below what the compiler itself offers).
    Chip("v5p", ("TPU v5p", "TPU v5"), 459e12, 96 * GiB, int(95.74 * GiB), ("v5p",), "v5p"),
    Chip("v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32 * GiB, int(31.25 * GiB), ("v6e",), "v6e"),
    # Ironwood: two TensorCores of 96 GiB each, each its own device.
    Chip("v7x", ("TPU7x", "TPU v7"), 2307e12, 192 * GiB, int(94.75 * GiB), ("v7x",), "tpu7x", devices_per_chip=2),
    Chip("A100", ("NVIDIA A100",), 312e12, fp32_peak_flops=156e12),
    Chip("H100", ("NVIDIA H100",), 989e12, fp32_peak_flops=494.7e12),
    Chip("H200", ("NVIDIA H200",), 989e12, fp32_peak_flops=494.7e12),
)
TPU_CHIPS = tuple(c for c in CHIPS if c.generations)


def chip_of_device(device) -> Chip | None:
    """The table's entry for a JAX device, or None (CPUs, unknown accelerators)."""
    matches = [(len(kind), chip) for chip in CHIPS for kind in chip.device_kinds if device.device_kind.startswith(kind)]
    return max(matches, key=lambda m: m[0])[1] if matches else None


class UnknownChip(ValueError):
    """A TPU generation without figures here: what needs them (the plan's memory check) is skipped."""


def tpu_chip(generation: str) -> Chip:
    """The TPU chip of a generation as Ray names it (v4, v5p, v5litepod, v6e, v7x)."""
    for chip in TPU_CHIPS:
        if generation.lower() in chip.generations:
            return chip
    known = ", ".join(g for chip in TPU_CHIPS for g in chip.generations)
    raise UnknownChip(f"TPU generation {generation.lower()!r} has no memory figures in raysft; known: {known}")
