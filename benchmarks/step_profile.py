"""Where the time of W1's train step goes on this machine: a `jax.profiler` trace of the
bare jitted step of `train_throughput.py`, each executed XLA instruction attributed to the
part of the model whose Python code emitted it, forward and backward apart.

XLA's CPU runtime records one trace event per executed instruction (a fusion, a dot, a
copy). The compiled module's metadata names the Python call stack of each instruction;
the innermost raysft (or optax) function on that stack names its part. Times are summed
over the instructions of each part and divided by the traced steps; instructions that run
at once on different threads count each, so the parts can add up to a little more than
the step's wall time, which is printed next to them.

    python benchmarks/step_profile.py [--steps 4] [--top 15]
"""

from __future__ import annotations

import collections
import glob
import json
import re
import tempfile
import time

from pydantic_settings import BaseSettings, SettingsConfigDict

from raysft.workers.runtime.xla_cpu import run_as_cpu_worker

from train_throughput import Settings as BareSettings, bare_step, packed_batches

# The innermost function on an instruction's stack that is in this table names its part.
PARTS = {
    "attention core (scores, mask, softmax, weighted sum)": (
        "blocked_attention", "vanilla_attention", "dot_product_attention", "attention_mask", "_allowed",
    ),
    "RoPE": ("apply_rope", "rope_cos_sin"),
    "attention projections (q, k, v, o)": ("Attention.qkv", "Attention.out"),
    "MLP (gate, up, down)": ("MLP.__call__",),
    "RMS norms": ("RMSNorm.__call__",),
    "LM head and cross-entropy": ("DecoderForCausalLM.logits", "Embed.attend", "token_loss_sums"),
    "embedding lookup": ("DecoderForCausalLM.embed", "ModelRuntime.embed", "Embed.__call__"),
    "FLOPs count (segment pairs)": ("attention_pairs",),
    "optimizer (AdamW, grad norm, update)": ("apply_updates", "global_norm", "scale_by_adam.<locals>.update_fn"),
}
OTHER = "other (residual adds, copies of donated parameters, layout changes)"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(cli_parse_args=True, cli_prog_name="step_profile.py")

    steps: int = 4
    top: int = 15  # the most expensive instructions, printed with their part and shape


def _section(text: str, name: str) -> dict[int, str]:
    """One table (`FileNames`, `FunctionNames`, `FileLocations`, `StackFrames`) of the HLO text."""
    lines = text[text.index(f"\n{name}\n") + len(name) + 2 :].split("\n")
    table = {}
    for line in lines:
        match = re.match(r"(\d+) (.*)$", line)
        if not match:
            break
        table[int(match[1])] = match[2]
    return table


def instruction_stacks(hlo_text: str) -> dict[str, tuple[bool, list[str], str]]:
    """Each instruction: (is it in the backward pass, its call stack innermost first, what it is)."""
    functions = {k: v.strip('"') for k, v in _section(hlo_text, "FunctionNames").items()}
    locations = {k: int(re.search(r"function_name_id=(\d+)", v)[1]) for k, v in _section(hlo_text, "FileLocations").items()}
    frames = {}
    for k, v in _section(hlo_text, "StackFrames").items():
        location, parent = (int(x) for x in re.findall(r"=(\d+)", v))
        frames[k] = (location, parent - 1)  # the text writes a frame's parent id + 1 (0: no parent)

    def stack(frame: int) -> list[str]:
        names = []
        while frame > 0 and len(names) < 64:
            location, frame = frames[frame]
            names.append(functions[locations[location]])
        return names

    out = {}
    instruction = r"^\s*(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\(.*?metadata=\{op_name=\"([^\"]*)\"(?: stack_frame_id=(\d+))?"
    for match in re.finditer(instruction, hlo_text, re.M):
        name, shape, opcode, op_name, frame = match.groups()
        out[name] = ("transpose(" in op_name, stack(int(frame)) if frame else [], f"{opcode} {shape} {op_name}")
    return out


def part_of(stack: list[str]) -> str:
    for function in stack:
        for part, names in PARTS.items():
            if function in names:
                return part
    return OTHER


def main() -> None:
    run_as_cpu_worker()  # this process runs as raysft's CPU workers do, whatever it times
    import jax

    s = Settings()
    bare = BareSettings(steps=s.steps, warmup_steps=1, _cli_parse_args=False)
    step, params, opt_state, batches = bare_step(packed_batches(bare))
    stacks = instruction_stacks(step.lower(params, opt_state, batches[0], {}, 0).compile().as_text())
    attention = [st for _, st, _ in stacks.values() if "blocked_attention" in st]
    if not attention or "Attention.__call__" not in attention[0]:
        raise SystemExit("the compiled module's stack frames did not read as expected: no attention instruction "
                         "has Attention.__call__ on its stack")
    params, opt_state, metrics = step(params, opt_state, batches[0], {}, 0)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        for batch in batches[1:]:
            params, opt_state, metrics = step(params, opt_state, batch, {}, 0)
        jax.block_until_ready(metrics)
        wall_s = time.perf_counter() - start
        jax.profiler.stop_trace()
        (trace,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
        profile = jax.profiler.ProfileData.from_file(trace)
    spent = collections.defaultdict(float)  # (part, backward) -> seconds
    each = collections.Counter()  # instruction -> seconds
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in stacks:
                    backward, stack, _ = stacks[event.name]
                    spent[part_of(stack), backward] += event.duration_ns * 1e-9
                    each[event.name] += event.duration_ns * 1e-9
    total = sum(spent.values())
    parts = sorted({p for p, _ in spent}, key=lambda p: -(spent[p, False] + spent[p, True]))
    print(f"{'part':<70} {'forward ms':>10} {'backward ms':>11} {'share':>6}")
    for part in parts:
        f, b = spent[part, False] / s.steps * 1e3, spent[part, True] / s.steps * 1e3
        print(f"{part:<70} {f:>10.1f} {b:>11.1f} {(f + b) / (total / s.steps * 1e3):>6.1%}")
    print(f"\n{'instruction':<28} {'ms':>7}  part / what it is")
    for name, seconds in each.most_common(s.top):
        backward, stack, what = stacks[name]
        print(f"{name:<28} {seconds / s.steps * 1e3:>7.1f}  {part_of(stack)}, {'backward' if backward else 'forward'}: {what[:110]}")
    print(json.dumps({
        "benchmark": "step_profile W1",
        "device": jax.devices()[0].device_kind,
        "steps": s.steps,
        "step_wall_ms": round(wall_s / s.steps * 1e3, 1),
        "instructions_ms_per_step": round(total / s.steps * 1e3, 1),
        "share": {part: round((spent[part, False] + spent[part, True]) / total, 3) for part in parts},
        "backward_share": round(sum(v for (_, b), v in spent.items() if b) / total, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
