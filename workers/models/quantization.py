"""QLoRA's frozen base: projection kernels held as int8 or 4-bit NormalFloat (nf4) codes
with one absmax scale per block of inputs, dequantized inside the matmul.

The blocks are bitsandbytes' layout: `block` consecutive inputs of one output (a torch
Linear's [out, in] weight flattened row-major), so a kernel [in, out] has scales
[in / block, out]. nf4's 16 levels are the QLoRA paper's quantiles of a normal
distribution; int8's are 127 evenly spaced steps each side of zero.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], np.float32)
KINDS = ("int8", "nf4")
SCALE_LEAF = "kernel_scale"


@dataclasses.dataclass(frozen=True)
class Quantization:
    kind: str  # "int8" or "nf4"
    block: int  # inputs per scale

    @property
    def code_dtype(self):
        return jnp.int8 if self.kind == "int8" else jnp.uint4

    @classmethod
    def of(cls, codes, scales) -> "Quantization":
        """What quantized `codes` with `scales` (export reads a checkpoint's base this way)."""
        return cls("int8" if codes.dtype == jnp.int8 else "nf4", codes.shape[-2] // scales.shape[-2])

    def check(self, fan_in: int, name: str) -> None:
        if fan_in % self.block:
            raise ValueError(
                f"quantization_block_size {self.block} does not divide {name}'s {fan_in} inputs; choose a block size "
                "that divides every quantized projection's input size (64 is bitsandbytes' nf4 default)"
            )


def stored_bytes(size: int, dtype) -> int:
    """Bytes of `size` elements as devices hold them: 4-bit codes two to a byte (TPUs pack
    them; numpy's itemsize says 1)."""
    dtype = jnp.dtype(dtype)
    bits = jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else dtype.itemsize * 8
    return -(-size * bits // 8)


def is_scale(name: str) -> bool:
    return name.endswith("." + SCALE_LEAF)


def scale_name(kernel: str) -> str:
    """`...q_proj.kernel` -> `...q_proj.kernel_scale`."""
    return kernel.rsplit(".", 1)[0] + "." + SCALE_LEAF


def is_codes(name: str, names) -> bool:
    """A kernel held as codes: its scales are among `names`."""
    return name.endswith(".kernel") and scale_name(name) in names


def quantized_part(shapes: dict) -> dict:
    """The entries of `shapes` that are codes or their scales (what `load_quantized` reads)."""
    return {n: s for n, s in shapes.items() if is_scale(n) or is_codes(n, shapes)}


def _blocks(x, block: int):
    """[..., in, out] -> [..., in / block, block, out]."""
    *lead, fan_in, fan_out = x.shape
    return x.reshape(*lead, fan_in // block, block, fan_out)


def quantize(kernel, q: Quantization):
    """(codes [..., in, out], scales [..., in / block, out] in fp32) of a kernel."""
    x = _blocks(kernel.astype(jnp.float32), q.block)
    absmax = jnp.max(jnp.abs(x), axis=-2)
    unit = x / jnp.where(absmax == 0, 1.0, absmax)[..., None, :]  # in [-1, 1]
    if q.kind == "int8":
        codes, scales = jnp.round(unit * 127).astype(jnp.int8), absmax / 127
    else:  # the nearest level: levels are sorted, so count the midpoints below
        midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
        codes, scales = jnp.searchsorted(midpoints, unit).astype(jnp.uint4), absmax
    return codes.reshape(kernel.shape), scales


def dequantize(codes, scales, q: Quantization, dtype=jnp.float32):
    levels = codes.astype(jnp.float32) if q.kind == "int8" else jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)]
    return (_blocks(levels, q.block) * scales[..., None, :]).reshape(codes.shape).astype(dtype)


class QuantizedLinear(nnx.Module):
    """A frozen projection: `kernel` holds codes, `kernel_scale` their block scales; the
    matmul sees the dequantized kernel in the compute dtype. Its values come from a
    checkpoint quantized on load (`workers.models.loading`), never from initialisation."""

    def __init__(self, fan_in: int, fan_out: int, quantization: Quantization, *, use_bias, dtype, param_dtype, rngs):
        del rngs  # nothing random: the base is read from a checkpoint
        self.kernel = nnx.Param(jnp.zeros((fan_in, fan_out), quantization.code_dtype))
        self.kernel_scale = nnx.Param(jnp.ones((fan_in // quantization.block, fan_out), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((fan_out,), param_dtype)) if use_bias else None
        self.quantization, self.dtype = quantization, dtype

    def __call__(self, x):
        kernel = dequantize(self.kernel[...], self.kernel_scale[...], self.quantization, self.dtype)
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


@functools.lru_cache(maxsize=None)
def quantize_program(q: Quantization, out_shardings) -> Callable:
    """Jitted `quantize`, its codes and scales placed with `out_shardings`."""
    return jax.jit(lambda kernel: quantize(kernel, q), out_shardings=out_shardings)
