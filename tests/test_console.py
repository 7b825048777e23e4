"""What a person sees: raysft's own lines on the console, Ray's in run_dir/logs/ray.log.
Each command runs in a process of its own, with its own embedded Ray, as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import CORPUS, RAY_LINES, write_jsonl

MAIN = "import sys; from raysft.orchestrator.cli import main; sys.exit(main(sys.argv[1:]))"


def _raysft(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", MAIN, *map(str, argv)], capture_output=True, text=True, timeout=600)


def test_a_run_prints_raysft_lines_only_and_keeps_rays_in_the_run_dir(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": " ".join(CORPUS[i % 6 : i % 6 + 3])} for i in range(24)])
    run = _raysft("sft", "--repo_id", tiny_model_dir, "--dataset_name", data, "--max_sequence_length", 64,
                  "--total_batch_size", 4, "--max_training_steps", 2, "--log_steps", 1,
                  "--save_directory", tmp_path / "runs", "--model_name", "quiet",
                  "--cpu_devices_per_host", 2)  # two devices: the worker's collectives log Gloo lines
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    console = run.stdout + run.stderr
    assert not RAY_LINES.search(console), console
    assert "24 rows read" in run.stdout and "training from step 0 of 2" in run.stdout and "step     2  loss" in run.stdout
    assert run.stdout.endswith(f"exported: {tmp_path / 'runs' / 'quiet' / 'export'}\n")
    log = (tmp_path / "runs" / "quiet" / "logs" / "ray.log").read_text()
    # Nothing lost: the driver's Ray lines, Ray Data's, and the workers' own.
    assert "Started a local Ray instance" in log and "Execution plan of Dataset" in log, log
    # (its two devices write their Gloo lines at once, interleaved)
    assert re.search(r"\(RayTrainWorker pid=\d+, ip=[\d.]+\) \[Gloo\] Rank", log), log


def test_bad_input_is_one_line_and_verbose_shows_rays_lines(tmp_path, tiny_model_dir):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": line} for line in CORPUS])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"text": "fine"}, {"text": 7}])
    common = ["--repo_id", tiny_model_dir, "--max_sequence_length", 32, "--save_directory", tmp_path / "runs", "--show", 0]
    failed = _raysft("preprocess", *common, "--dataset_name", bad)
    assert failed.returncode == 2, failed.stderr
    assert failed.stderr.count("\n") == 1 and failed.stderr.startswith(f"raysft preprocess: {bad}: row 3: "), failed.stderr
    assert not RAY_LINES.search(failed.stdout), failed.stdout

    verbose = _raysft("preprocess", *common, "--dataset_name", good, "--verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "Started a local Ray instance" in verbose.stderr and "Execution plan of Dataset" in verbose.stderr
    assert f"{len(CORPUS)} rows read" in verbose.stdout
