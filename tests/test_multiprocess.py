"""Two processes on localhost joined by jax.distributed.initialize (gloo on CPU): they train the tiny model on
their own grain shards, agree on every loss, write one checkpoint together, restore it and continue; a process whose
peer is killed exits with an error instead of hanging. Every launch is bounded by a timeout."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HELPER = Path(__file__).parent / "helpers" / "run_train.py"
TIMEOUT = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One persistent compilation cache for every launch of this module (same programs, compiled once)."""
    return tmp_path_factory.mktemp("jax_cache")


def _launch(workdir: Path, tmp: Path, steps: int, tag: str, cache: Path, delay: float = 0.0) -> list[subprocess.Popen]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    port = _free_port()
    return [subprocess.Popen(
        [sys.executable, str(HELPER), "--workdir", str(workdir), "--steps", str(steps), "--checkpoint-every", "3",
         "--batch", "4", "--step-delay", str(delay), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i), "--out", str(tmp / f"{tag}_{i}.json")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish(procs: list[subprocess.Popen], tmp: Path, tag: str) -> list[dict]:
    try:
        outputs = [proc.communicate(timeout=TIMEOUT) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (_, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-3000:]
    return [json.loads((tmp / f"{tag}_{i}.json").read_text()) for i in range(2)]


def test_two_processes_train_checkpoint_and_restore(tmp_path, cache):
    workdir = tmp_path / "run"
    first = _finish(_launch(workdir, tmp_path, 6, "first", cache), tmp_path, "first")
    assert first[0]["start"] == first[1]["start"] == 0
    assert list(first[0]["losses"]) == [str(s) for s in range(1, 7)]
    assert first[0]["losses"] == first[1]["losses"]
    assert first[0]["params"] == first[1]["params"]
    data_files = sorted(p.name for p in (workdir / "checkpoints" / "6" / "data").glob("*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]

    second = _finish(_launch(workdir, tmp_path, 8, "second", cache), tmp_path, "second")
    assert second[0]["start"] == second[1]["start"] == 6
    assert list(second[0]["losses"]) == ["7", "8"]
    assert second[0]["losses"] == second[1]["losses"]
    assert second[0]["params"] == second[1]["params"] != first[0]["params"]


def test_a_process_whose_peer_dies_exits_with_one_line_within_a_minute(tmp_path):
    """training.py on two processes; process 1 is killed mid-run: process 0 exits non-zero within 60 s with one
    line saying it lost its peer (not a hang, not a stack trace)."""
    port = _free_port()
    workdir = tmp_path / "run"
    # the smallest U-Net training.py builds (one level, 8x8): what is tested is the peer-loss exit, not the model
    argv = [sys.executable, str(TRAINING), "--dataset", "digits", "--image-size", "8", "--model", "unet-tiny",
            "--model-config", '{"channel_mult": [1]}', "--batch-size", "4", "--steps", "100000", "--log-every", "1",
            "--preview-per-class", "0", "--checkpoint-every", "100000", "--workdir", str(workdir),
            "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([*argv, "--process-id", str(i)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 4 * TIMEOUT
        metrics = workdir / "metrics.jsonl"
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
            assert procs[0].poll() is None and procs[1].poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = procs[0].communicate(timeout=TIMEOUT)
        elapsed = time.monotonic() - killed
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    last = stderr.strip().splitlines()[-1]
    # both ends of stderr: the first exception (if any) and the exit path (the rare heavy-load failure aborts in the
    # coordination service's shutdown barrier, whose long message would hide the start)
    assert procs[0].returncode == 3, f"{stderr[:3000]}\n...\n{stderr[-1500:]}"
    assert last.startswith("training.py: error: process 0 lost contact with another process of the 2-process run")
    assert "--resume" in last and elapsed < 60


TRAINING = Path(__file__).resolve().parents[1] / "training.py"


@pytest.mark.parametrize("process_id", [0, 1])
def test_a_process_whose_peers_never_start_exits_with_one_line(tmp_path, process_id):
    """Only one of two processes starts: it gives up after --startup-timeout with a line naming the coordinator,
    its process id and the expected count (process 0 hosts the coordinator, process 1 only connects to it)."""
    port = _free_port()
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(TRAINING), "--dataset", "digits", "--steps", "1", "--workdir", str(tmp_path / "w"),
         "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(process_id),
         "--startup-timeout", "3"],
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=TIMEOUT)
    elapsed = time.monotonic() - start
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last.startswith(f"training.py: error: process {process_id} could not join the 2-process run at "
                           f"coordinator 127.0.0.1:{port} within 3 s"), last
    assert "start every process with the same --coordinator-address" in last
    assert elapsed < 60
    assert not (tmp_path / "w").exists()
