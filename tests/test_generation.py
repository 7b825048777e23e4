"""The KV-cache sampler against transformers' `generate` and its logits warpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import raysft as rs
from conftest import save_tiny_model
from raysft.workers.generation.sampler import PromptTooLong, Sampler, SamplingParams, filtered_logits
from test_model_parity import VARIANTS


def _reference_greedy(model_dir, prompts, new_tokens, **kwargs) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:  # one at a time: no padding on the reference side
        ids = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens, **kwargs)
        out.append(ids[0, len(prompt):].tolist())
    return out


@pytest.mark.parametrize(
    "variant, scan_layers",
    [("llama-untied-gqa2", False), ("mistral-window", True), ("qwen2-window-from-layer-1", True),
     ("qwen3-bias-window", False), ("gemma2-capped-tied", True), ("gemma3-5to1-local-rope", False),
     ("phi3-longrope-partial-tied", True), ("qwen3moe-raw-top3-window", True), ("mixtral-window", False)],
)
def test_greedy_tokens_match_transformers_generate(tmp_path, variant, scan_layers):
    """Batched prompts of different lengths (left-padded in one batch here, one by one
    there), decoded past the sliding windows: the same tokens."""
    architecture, overrides = VARIANTS[variant]
    model_dir = save_tiny_model(tmp_path, vocab_size=97, architecture=architecture, **overrides)
    model = rs.AutoModelForCausalLM.from_pretrained(model_dir, scan_layers=scan_layers)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 97, size=n).tolist() for n in (5, 17, 9)]
    sampler = Sampler(model.layout, stop_token_ids=[], max_length=512)

    ours = sampler.generate(model.params, prompts, SamplingParams(max_new_tokens=12))

    expected = _reference_greedy(model_dir, prompts, 12, min_new_tokens=12, eos_token_id=None, pad_token_id=0)
    assert ours == expected


def test_smollm2_greedy_answers_match_transformers_generate(gguf_file, smollm2_cache, monkeypatch):
    """The real SmolLM2-135M-Instruct, its chat template and its end-of-turn token."""
    from transformers import AutoTokenizer

    from raysft.workers.generation.text_generation import TextGenerator

    monkeypatch.setenv("RAYSFT_CACHE", str(smollm2_cache))
    model = rs.AutoModelForCausalLM.from_pretrained(gguf_file, scan_layers=True)
    tokenizer = AutoTokenizer.from_pretrained(model.model_dir)
    generator = TextGenerator(model.layout, tokenizer, model.model_dir, max_length=8192)
    questions = ["What is the capital of France?", "How many days are in 3 weeks?", "Name a primary colour."]
    prompts = [generator.encode(q) for q in questions]
    assert generator.sampler.stop_token_ids.tolist() == [tokenizer.convert_tokens_to_ids("<|im_end|>")]

    ours = generator.sampler.generate(model.params, prompts, SamplingParams(max_new_tokens=24))

    assert ours == _reference_greedy(model.model_dir, prompts, 24)
    assert any(tokens[-1] == tokenizer.eos_token_id for tokens in ours)  # some answer ended at its end of turn
    answers = generator.generate(model.params, questions, SamplingParams(max_new_tokens=24))
    assert answers[0] == "The capital of France is Paris."


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.9), (20, 0.7), (1, 0.5), (200, 0.95)])
def test_filtered_logits_keep_what_transformers_warpers_keep(top_k, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(top_k).normal(size=(4, 97)).astype(np.float32) * 3
    expected = torch.from_numpy(logits)
    for warper in [TemperatureLogitsWarper(0.7)] + ([TopKLogitsWarper(top_k)] if top_k else []) + [TopPLogitsWarper(top_p)]:
        expected = warper(None, expected)

    ours = np.asarray(filtered_logits(logits, np.float32(0.7), np.int32(top_k), np.float32(top_p)))

    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected.numpy()))
    np.testing.assert_allclose(ours[np.isfinite(ours)], expected.numpy()[np.isfinite(ours)], rtol=1e-6)


def test_sampling_is_seeded_and_top_k_1_is_greedy(tmp_path):
    model_dir = save_tiny_model(tmp_path, vocab_size=97)
    model = rs.AutoModelForCausalLM.from_pretrained(model_dir)
    sampler = Sampler(model.layout, stop_token_ids=[], max_length=512)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    warm = SamplingParams(max_new_tokens=16, temperature=1.5, seed=1)

    first = sampler.generate(model.params, prompts, warm)

    assert sampler.generate(model.params, prompts, warm) == first
    assert sampler.generate(model.params, prompts, SamplingParams(16, 1.5, seed=2)) != first
    greedy = sampler.generate(model.params, prompts, SamplingParams(16))
    assert greedy != first
    assert sampler.generate(model.params, prompts, SamplingParams(16, 1.5, top_k=1, seed=3)) == greedy


def _softmax_reference(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The distribution sampling should draw from, written out: softmax of logits /
    temperature over the top_k largest, then the fewest largest whose mass reaches top_p."""
    order = np.argsort(-logits)
    keep = np.zeros(len(logits), bool)
    keep[order[: top_k or len(logits)]] = True
    probs = np.where(keep, np.exp((logits - logits.max()) / temperature), 0.0)
    probs /= probs.sum()
    mass = np.cumsum(probs[order])
    keep[order[np.searchsorted(mass, top_p) + 1:]] = False
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (2.0, 6, 0.9)])
def test_draws_follow_the_filtered_softmax(temperature, top_k, top_p):
    """20,000 draws against the distribution written out in numpy: no token outside the
    filter, frequencies within a chi-square test (p > 1e-4) and 0.02 total variation."""
    from scipy.stats import chisquare

    from raysft.workers.generation.sampler import sample_tokens

    logits = np.random.default_rng(0).normal(0, 1.5, size=10).astype(np.float32)
    expected = _softmax_reference(logits.astype(np.float64), temperature, top_k, top_p)
    draws = 20_000
    tokens = np.asarray(sample_tokens(jnp.tile(logits, (draws, 1)), jax.random.key(7), jnp.float32(temperature),
                                      jnp.int32(top_k), jnp.float32(top_p)))
    counts = np.bincount(tokens, minlength=len(logits))
    assert not counts[expected == 0].any()
    kept = expected > 0
    assert chisquare(counts[kept], draws * expected[kept]).pvalue > 1e-4
    assert 0.5 * np.abs(counts / draws - expected).sum() < 0.02


def test_the_sampling_key_advances_with_every_token(tmp_path):
    """At a temperature where the softmax is uniform, each step's token is a fresh uniform
    draw: a key reused across steps would repeat the same token."""
    from scipy.stats import chisquare

    model_dir = save_tiny_model(tmp_path, vocab_size=97)
    model = rs.AutoModelForCausalLM.from_pretrained(model_dir)
    sampler = Sampler(model.layout, stop_token_ids=[], max_length=256)
    rows = sampler.generate(model.params, [[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=240, temperature=1e4, seed=3))
    tokens = np.array(rows)
    assert tokens.shape == (2, 240)
    repeats = np.mean(tokens[:, 1:] == tokens[:, :-1])
    assert repeats < 0.05, repeats  # 1/97 expected
    assert (tokens[0] != tokens[1]).mean() > 0.9  # rows draw apart within a step
    assert chisquare(np.bincount(tokens.ravel(), minlength=97)).pvalue > 1e-4


def test_stops_at_stop_tokens_and_strings_and_refuses_bad_input(tiny_model_dir):
    from transformers import AutoTokenizer

    from raysft.workers.generation.text_generation import TextGenerator

    model = rs.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    generator = TextGenerator(model.layout, tokenizer, None, max_length=40)
    params = model.params
    free = generator.sampler.generate(params, [[5, 6, 7]], SamplingParams(24))[0]
    stop = free[5]
    stopping = Sampler(model.layout, stop_token_ids=[stop], max_length=40)
    assert stopping.generate(params, [[5, 6, 7]], SamplingParams(24))[0] == free[: free.index(stop) + 1]

    text = generator.generate(params, ["the cat"], SamplingParams(24))[0]
    assert len(text) > 4
    cut_at = text[len(text) // 2 : len(text) // 2 + 2]
    assert generator.generate(params, ["the cat"], SamplingParams(24), stop_strings=[cut_at])[0] == text[: text.index(cut_at)]

    long_prompt = "the cat sat on the mat " * 20
    with pytest.raises(PromptTooLong, match=r"prompt 0 has \d+ tokens: with max_new_tokens 4, more than the model's "
                       "context of 40"):
        generator.generate(params, [long_prompt], SamplingParams(4))
    answers, warnings = generator.generate_with_warnings(params, [long_prompt], SamplingParams(4), truncate=True)
    assert len(answers) == 1 and "its first" in warnings[0]
    # A prompt that fits, but not with the answer it asks for: refused, or cut to leave room.
    fits = generator.encode("the cat sat on the mat")
    assert len(fits) < 40 < len(fits) + 24
    with pytest.raises(PromptTooLong, match="with max_new_tokens 24"):
        generator.sampler.generate(params, [fits], SamplingParams(24))
    _, warnings = generator.generate_with_warnings(params, ["the cat sat on the mat"], SamplingParams(24),
                                                   truncate=True)
    assert "more than the 16 the model's context of 40 leaves beside 24 new ones" in warnings[0]
    for bad, message in [
        (dict(max_new_tokens=0), "max_new_tokens must be > 0"), (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"), (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            SamplingParams(**bad)


def test_eval_rows_become_prompts_and_references():
    from raysft.storage.errors import DataError
    from raysft.data.eval_prompts import split_answer
    from raysft.data.formats import to_example
    from raysft.workers.generation.text_generation import exact_match

    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                         {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                         {"role": "assistant", "content": "a2"}]}
    assert split_answer(to_example(chat, "messages", "text", "r"), "r") == {
        "messages": chat["messages"][:4], "tools": None, "reference": "a2"}
    pc = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}
    assert split_answer(to_example(pc, "prompt_completion", "text", "r"), "r")["reference"] == "a"
    assert split_answer(to_example({"prompt": "2+2=", "completion": "4"}, "prompt_completion", "text", "r"), "r") == {
        "text": "2+2=", "reference": "4"}
    instruction = to_example({"instruction": "Add", "input": "2 and 2", "output": "4"}, "instruction", "text", "r")
    assert split_answer(instruction, "r") == {"text": "Add\n\n2 and 2\n\n", "reference": "4"}
    with pytest.raises(DataError, match="data.jsonl: row 3: generate_during_eval needs rows with a prompt and an answer"):
        split_answer(to_example({"text": "plain"}, "text", "text", "r"), "data.jsonl: row 3")

    assert exact_match("  The answer is 4.", "the answer  is 4") and not exact_match("The answer is 5.", "The answer is 4.")


def test_sharded_parameters_generate_what_one_device_does(tmp_path):
    """On a 4-device mesh with the training shardings (as on a TPU host when a copy per
    chip does not fit), rows split over the mesh (4 prompts) or replicated (2)."""
    from raysft.workers.runtime.mesh import global_mesh
    from raysft.workers.models.partition import param_sharding
    from raysft.workers.models.auto import build_layout
    from raysft.workers.models.config import ModelConfig
    from raysft.workers.models.loading import load_params
    from raysft.workers.models.runtime import ModelRuntime

    model_dir = save_tiny_model(tmp_path, vocab_size=96)  # which tp=2 splits
    single = rs.AutoModelForCausalLM.from_pretrained(model_dir)
    mesh = global_mesh(1, 2, 2, 1)  # parameters split over fsdp and tp
    layout = build_layout(ModelConfig.from_file(model_dir / "config.json"), np.float32, np.float32, ModelRuntime(mesh=mesh))
    params, _ = load_params(model_dir, layout, lambda name, shape: param_sharding(mesh, name, shape))
    assert any(not p.sharding.is_fully_replicated for p in params.values())
    rng = np.random.default_rng(2)
    sampling = SamplingParams(max_new_tokens=10, temperature=0.9, seed=4)
    for count in (4, 2):
        prompts = [rng.integers(1, 96, size=n).tolist() for n in (3, 11, 7, 20)[:count]]
        expected = Sampler(single.layout, [], 512).generate(single.params, prompts, sampling)
        assert Sampler(layout, [], 512, mesh=mesh).generate(params, prompts, sampling) == expected


def test_chat_truncation_keeps_the_system_prompt_and_drops_the_oldest_turns(chat_model_dir):
    from transformers import AutoTokenizer

    from raysft.workers.generation.text_generation import TextGenerator

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    model = rs.AutoModelForCausalLM.from_pretrained(chat_model_dir)
    generator = TextGenerator(model.layout, tokenizer, None, max_length=256)
    system = {"role": "system", "content": "be brief"}
    turns = [{"role": role, "content": f"turn {i} the cat sat on the mat"}
             for i, role in zip(range(8), ["user", "assistant"] * 4)]
    prompt = {"messages": [system, *turns]}
    (ids,), warnings = generator.encode_all([prompt], truncate=True, room=8)
    kept = next(n for n in range(1, 8) if generator.encode({"messages": [system, *turns[n:]]}) == ids)
    assert len(generator.encode(prompt)) > 248 >= len(ids)
    assert len(generator.encode({"messages": [system, *turns[kept - 1:]]})) > 248
    assert f"its {kept} oldest messages were left out" in warnings[0]
    text = tokenizer.decode(ids)
    assert text.startswith(tokenizer.decode(generator.encode({"messages": [system]}))) and "turn 7" in text
    with pytest.raises(PromptTooLong, match="the last message alone"):
        generator.encode_all([{"messages": [system, {"role": "user", "content": "cat " * 300}]}], truncate=True)


def test_a_copy_for_decoding_must_fit_beside_what_training_holds():
    """Training's parameters and optimizer state hold 60% of the device: a copy of the
    parameters (a quarter of it) would leave too little for the KV cache, so decoding
    uses the training shards."""
    from raysft.workers.generation.sampler import copy_fits

    limit = 16 << 30
    assert not copy_fits({"bytes_limit": limit, "bytes_in_use": int(0.6 * limit)}, limit // 4)
    assert copy_fits({"bytes_limit": limit, "bytes_in_use": int(0.1 * limit)}, limit // 4)
    assert copy_fits(None, limit)  # CPU devices report nothing: one host's copy is its own memory


def test_sliding_layers_cache_only_their_window():
    """Gemma 3 27B at 8,192 slots: its 52 sliding layers keep rings of 1,024 and its 10
    global layers every slot, about a quarter of full-length caches; a window as long as
    the cache is no window."""
    from pathlib import Path

    from raysft.workers.models.config import ModelConfig
    from raysft.workers.models.kv_cache import empty_cache

    configs = Path(__file__).parents[1] / "benchmarks" / "model_configs"
    cfg = ModelConfig.from_file(configs / "Gemma-3-27B" / "config.json")
    cache = jax.eval_shape(lambda: empty_cache(cfg, jnp.zeros(2, jnp.int32), 8192, jnp.bfloat16))
    assert cache.k_LxBxGxSxK.shape == (10, 2, 16, 8192, 128)
    assert cache.k_RxBxGxWxK.shape == (52, 2, 16, 1024, 128)
    held = sum(x.size for x in (cache.k_LxBxGxSxK, cache.k_RxBxGxWxK))
    assert held / (62 * 2 * 16 * 8192 * 128) == (10 * 8192 + 52 * 1024) / (62 * 8192)  # 0.266
    short = jax.eval_shape(lambda: empty_cache(cfg, jnp.zeros(2, jnp.int32), 1024, jnp.bfloat16))
    assert short.k_LxBxGxSxK.shape[0] == 62 and short.k_RxBxGxWxK.shape[0] == 0
