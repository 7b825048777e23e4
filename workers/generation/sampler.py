"""Token sampling from our models: prefill the prompts into a KV cache, then decode inside
one compiled loop, chunk by chunk, until every row has stopped.

Shapes are bucketed (rows to powers of two, prompt lengths to four sizes per power of
two, the cache to prompt bucket + `max_new_tokens`), so a sampler compiles a bounded
number of programs; temperature, top-k, top-p and the seed are traced values, so
changing them compiles nothing. See `Placement` for where decoding runs on a mesh."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from raysft.workers.models.kv_cache import empty_cache, forward_cached
from raysft.workers.models.params import ParamLayout

_MIN_PROMPT_BUCKET = 16
# Halvings of a row's logit range when finding a top-k or top-p floor: 2^-40 of it is
# below the float32 spacing of any logit, so the floor found is exact.
_BISECTIONS = 40


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: every token
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class PromptTooLong(ValueError):
    """A prompt longer than the model's context; the message names both lengths."""


def _bucket(n: int, floor: int = 1) -> int:
    """n rounded up to one of four sizes per power of two (16, 20, 24, 28, 32, 40, 48,
    ...): at most 25% padding, and a bounded number of programs to compile."""
    n = max(n, floor)
    step = 1 << max(n.bit_length() - 3, 0)
    return -(-n // step) * step


def sample_tokens(logits_BxV, key, temperature, top_k, top_p):
    """One token per row: argmax when temperature is 0, else a draw from the softmax of
    `filtered_logits`."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    draw = lambda logits_BxV: jax.random.categorical(key, filtered_logits(logits_BxV, temperature, top_k, top_p), axis=-1)  # noqa: E731
    greedy = lambda logits_BxV: jnp.argmax(logits_BxV, axis=-1)  # noqa: E731
    return jax.lax.cond(temperature == 0, greedy, draw, logits_BxV).astype(jnp.int32)


def filtered_logits(logits_BxV, temperature, top_k, top_p):
    """logits / temperature, -inf outside the top_k tokens (0: all) and then outside the
    smallest set whose probability reaches top_p (transformers' order of the two; ties
    at a boundary are kept, as there)."""
    scaled_BxV = logits_BxV.astype(jnp.float32) / temperature
    top_k_floor_B = _largest_floor(scaled_BxV, lambda above_BxV: jnp.sum(above_BxV, -1) >= top_k)
    scaled_BxV = jnp.where((top_k > 0) & (scaled_BxV < top_k_floor_B[:, None]), -jnp.inf, scaled_BxV)
    probs_BxV = jax.nn.softmax(scaled_BxV, axis=-1)
    # The mass below the floor against 1 - top_p, summed from the low side as transformers
    # does: top_p = 1 then keeps every token whatever the rounding of the total.
    top_p_floor_B = _largest_floor(scaled_BxV, lambda above_BxV: jnp.sum(jnp.where(above_BxV, 0.0, probs_BxV), -1) <= 1 - top_p)
    return jnp.where(scaled_BxV < top_p_floor_B[:, None], -jnp.inf, scaled_BxV)


def _largest_floor(values_BxV, enough):
    """Per row, the largest value f among the row's values such that `enough(values >= f)`
    holds (it holds at the row's minimum). Bisection over the values: XLA's sort of a
    vocabulary per token costs more than the model's forward pass on CPU."""
    finite_BxV = jnp.isfinite(values_BxV)
    low_B = jnp.min(jnp.where(finite_BxV, values_BxV, jnp.inf), axis=-1)  # enough holds here
    high_B = jnp.max(values_BxV, axis=-1) + 1.0  # and not above the maximum

    def halve(_, bounds):
        low_B, high_B = bounds
        mid_B = (low_B + high_B) / 2
        ok_B = enough(values_BxV >= mid_B[:, None])
        return jnp.where(ok_B, mid_B, low_B), jnp.where(ok_B, high_B, mid_B)

    low_B, _ = jax.lax.fori_loop(0, _BISECTIONS, halve, (low_B, high_B))
    # Snap to the smallest value at or above the bound: the exact floor once the bound
    # lies between two neighbouring values.
    return jnp.min(jnp.where(values_BxV >= low_B[:, None], values_BxV, jnp.inf), axis=-1)


class Sampler:
    """Generates token ids for batches of tokenized prompts.

    `stop_token_ids`: a row stops after emitting one (EOS, end of turn). `stopped(row,
    tokens)`, when given to `generate`, is asked after every chunk of `chunk` tokens
    (stop strings); decoding ends when every row has stopped or at `max_new_tokens`.
    """

    def __init__(
        self,
        layout: ParamLayout,
        stop_token_ids: Sequence[int],
        max_length: int,
        pad_token_id: int = 0,
        mesh: jax.sharding.Mesh | None = None,
        chunk: int = 32,
    ):
        self.layout = layout
        self.stop_token_ids = np.asarray(sorted(set(stop_token_ids)) or [-1], np.int32)
        self.max_length, self.pad_token_id, self.chunk = max_length, pad_token_id, chunk
        # Prompts (and so the cache) are split by rows over every device of the mesh; what
        # every host reads back is replicated.
        self.mesh = mesh
        self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None else None
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("cache_length", "max_new_tokens"))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1,))
        if mesh is not None:
            self._replicate = jax.jit(lambda arrays: arrays, out_shardings=self.replicated)

    def generate(
        self,
        params: dict[str, jax.Array],
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        stopped: Callable[[int, list[int]], bool] | None = None,
    ) -> list[list[int]]:
        """The new tokens of each prompt, up to and including its stop token."""
        for i, prompt in enumerate(prompts):
            if not len(prompt):
                raise ValueError(f"prompt {i} is empty")
            if len(prompt) + sampling.max_new_tokens > self.max_length:
                raise PromptTooLong(
                    f"prompt {i} has {len(prompt)} tokens: with max_new_tokens {sampling.max_new_tokens}, more than "
                    f"the model's context of {self.max_length}"
                )
        # Rows to a power of two, so they split evenly over a mesh.
        rows, width = 1 << (len(prompts) - 1).bit_length(), _bucket(max(map(len, prompts)), _MIN_PROMPT_BUCKET)
        ids = np.full((rows, width), self.pad_token_id, np.int32)
        start = np.zeros(rows, np.int32)
        for i in range(rows):  # rows past the prompts repeat the first one, and are done at once
            prompt = prompts[i] if i < len(prompts) else prompts[0]
            start[i] = width - len(prompt)
            ids[i, start[i]:] = prompt
        knobs = tuple(self._put(np.asarray(value, dtype)) for value, dtype in (
            (sampling.temperature, np.float32), (sampling.top_k, np.int32), (sampling.top_p, np.float32),
            (sampling.seed, np.uint32),
        ))
        new = sampling.max_new_tokens
        padding_rows = np.arange(rows) >= len(prompts)  # done from the start
        state = self._prefill(
            params, self._put(ids, by_rows=True), self._put(start, by_rows=True), self._put(padding_rows, by_rows=True),
            knobs, cache_length=width + new, max_new_tokens=new,
        )
        while True:
            steps, done, out = self._read(state["steps"], state["done"], state["out"])
            steps = int(steps)
            if stopped is not None:
                for i in np.flatnonzero(~done[: len(prompts)]):
                    done[i] = stopped(int(i), _until_stop(out[i, :steps], self.stop_token_ids))
                state["done"] = self._put(done, by_rows=True)
            if steps >= new or done.all():
                return [_until_stop(out[i, :steps], self.stop_token_ids) for i in range(len(prompts))]
            limit = min(steps + self.chunk, new) if stopped is not None else new
            state = self._decode(params, state, knobs, self._put(np.int32(limit)))

    def _read(self, *arrays: jax.Array) -> list[np.ndarray]:
        """Arrays split by rows over the mesh, as numpy on every host: gathered once per
        chunk, as decoding itself moves no row between devices."""
        if self.replicated is not None:
            arrays = self._replicate(arrays)
        return [np.array(a.addressable_data(0)) for a in arrays]

    def _put(self, value: np.ndarray, by_rows: bool = False) -> jax.Array:
        """The same host value on every host as one global array: replicated, or split by
        rows over the mesh where they divide evenly."""
        if self.mesh is None:
            return jnp.asarray(value)
        sharding = self.replicated
        if by_rows and value.shape[0] % self.mesh.size == 0:
            sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(self.mesh.axis_names))
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    def _logits(self, model, ids_BxT, cache, index):
        hidden_BxTxD, cache = forward_cached(model, ids_BxT, cache, index)
        return model.logits(hidden_BxTxD[:, -1]), cache

    def _emit(self, state, logits_BxV, knobs):
        temperature, top_k, top_p, seed = knobs
        key = jax.random.fold_in(jax.random.key(seed), state["steps"])
        token_B = sample_tokens(logits_BxV, key, temperature, top_k, top_p)
        token_B = jnp.where(state["done"], self.pad_token_id, token_B)
        out_BxN = state["out"].at[:, state["steps"]].set(token_B)
        done_B = state["done"] | jnp.isin(token_B, self.stop_token_ids)
        return dict(state, token=token_B, out=out_BxN, done=done_B, steps=state["steps"] + 1)

    def _prefill_fn(self, params, ids_BxP, start_B, done_B, knobs, *, cache_length, max_new_tokens):
        model = self.layout.bind(params)
        rows, width = ids_BxP.shape
        cache = empty_cache(model.config, start_B, cache_length, model.dtype)
        logits_BxV, cache = self._logits(model, ids_BxP, cache, 0)
        state = {
            "cache": cache, "index": jnp.int32(width), "steps": jnp.int32(0), "done": done_B,
            "token": jnp.zeros(rows, jnp.int32), "out": jnp.full((rows, max_new_tokens), self.pad_token_id, jnp.int32),
        }
        return self._emit(state, logits_BxV, knobs)

    def _decode_fn(self, params, state, knobs, limit):
        model = self.layout.bind(params)

        def step(state):
            logits_BxV, cache = self._logits(model, state["token"][:, None], state["cache"], state["index"])
            return self._emit(dict(state, cache=cache, index=state["index"] + 1), logits_BxV, knobs)

        return jax.lax.while_loop(lambda s: (s["steps"] < limit) & ~jnp.all(s["done"]), step, state)


def copy_fits(stats: dict | None, copy_bytes: int) -> bool:
    """Whether a whole copy of the parameters fits in half of what a device has free now
    (`memory_stats()`: what training holds is in use; the other half is for the KV cache
    and decoding's temporaries). A device that reports nothing (a CPU) takes it."""
    if not stats or "bytes_limit" not in stats:
        return True
    return copy_bytes <= (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) / 2


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where decoding runs. Parameters whose copy fits beside what training holds
    (`copy_fits`, asked at every `place`) are copied to every device, so no decoded token
    needs a collective; else they stay sharded as in training (each token gathers them
    layer by layer). On CPU one device per host
    decodes: a host's virtual devices share its cores, and rows split across them decode
    slower than on one (32 prompts x 48 tokens of SmolLM2-135M: 10.6 s on one device of
    a 2-core host, 18.4 s over its 4 virtual devices)."""

    mesh: jax.sharding.Mesh | None
    replicate: bool

    @classmethod
    def choose(cls, mesh: jax.sharding.Mesh | None) -> "Placement":
        if mesh is None or mesh.size == 1:
            return cls(mesh, False)
        if mesh.devices.flat[0].platform == "cpu":
            firsts = [min((d for d in mesh.devices.flat if d.process_index == p), key=lambda d: d.id)
                      for p in sorted({d.process_index for d in mesh.devices.flat})]
            mesh = jax.sharding.Mesh(np.array(firsts), ("hosts",))
        return cls(mesh, True)

    def place(self, params: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The parameters where `mesh` decodes with them."""
        copy_bytes = sum(x.nbytes for x in params.values())
        if not self.replicate or not copy_fits(jax.local_devices()[0].memory_stats(), copy_bytes):
            return params
        copies = jax.sharding.NamedSharding(next(iter(params.values())).sharding.mesh, jax.sharding.PartitionSpec())
        gathered = jax.jit(lambda p: p, out_shardings=jax.tree.map(lambda _: copies, params))(params)
        if copies.mesh == self.mesh:
            return gathered
        # One device per host (its own mesh, even where that is every device): its whole
        # copy is taken as it is.
        decoding = set(self.mesh.devices.flat)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return jax.tree.map(
            lambda x: jax.make_array_from_single_device_arrays(
                x.shape, replicated, [s.data for s in x.addressable_shards if s.device in decoding]
            ),
            gathered,
        )


def _until_stop(tokens: np.ndarray, stop_token_ids: np.ndarray) -> list[int]:
    stops = np.flatnonzero(np.isin(tokens, stop_token_ids))
    return tokens[: stops[0] + 1 if len(stops) else len(tokens)].tolist()
