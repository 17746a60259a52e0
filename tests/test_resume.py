"""Preemption safety: kill -9 at a random step, resume, SIGTERM, resume again — the losses of every step and the
final params equal an uninterrupted run's bitwise (same CPU, same executables, deterministic data order).

Runs tests/helpers/run_train.py in subprocesses that share one persistent compilation cache.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

HELPER = Path(__file__).parent / "helpers" / "run_train.py"
STEPS = 24
EVERY = 4
TIMEOUT = 120


def _env(cache: Path) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def _start(workdir: Path, env: dict, out: Path | None = None, delay: float = 0.0) -> subprocess.Popen:
    cmd = [sys.executable, str(HELPER), "--workdir", str(workdir), "--steps", str(STEPS), "--checkpoint-every",
           str(EVERY), "--step-delay", str(delay)]
    if out is not None:
        cmd += ["--out", str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _logged(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _wait_for_step(proc: subprocess.Popen, workdir: Path, step: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not any(r["step"] >= step for r in _logged(workdir)):
        assert proc.poll() is None, f"process ended early with {proc.returncode}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"step {step} not reached in {TIMEOUT} s"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, f"exit {proc.returncode}: {stderr[-3000:]}"
    return int(next(line for line in stdout.splitlines() if line.startswith("START")).split()[1]), stderr


def _committed(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_kill9_sigterm_and_resume_equal_an_uninterrupted_run(tmp_path):
    env = _env(tmp_path / "jax_cache")
    reference = _start(tmp_path / "reference", env, tmp_path / "reference.json")
    _finish(reference)
    ref = json.loads((tmp_path / "reference.json").read_text())
    assert ref["start"] == 0 and sorted(map(int, ref["losses"])) == list(range(1, STEPS + 1))

    workdir = tmp_path / "interrupted"
    kill_at = random.randint(EVERY + 1, 14)
    victim = _start(workdir, env, delay=0.1)
    _wait_for_step(victim, workdir, kill_at)
    deadline = time.monotonic() + TIMEOUT
    while not (workdir / "checkpoints").exists() or not _committed(workdir):  # the async save of step 4 landed
        assert victim.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    committed_before_kill = _committed(workdir)[-1]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=TIMEOUT)
    killed_steps = max(r["step"] for r in _logged(workdir))

    resumed = _start(workdir, env, tmp_path / "resumed.json", delay=0.1)
    term_at = killed_steps + 3
    _wait_for_step(resumed, workdir, term_at)
    resumed.send_signal(signal.SIGTERM)
    start, stderr = _finish(resumed)
    assert "finishing this step, saving and stopping" in stderr
    after_term = json.loads((tmp_path / "resumed.json").read_text())
    # resumed from the last committed periodic checkpoint at or before the kill
    assert start % EVERY == 0 and committed_before_kill <= start <= killed_steps, (kill_at, killed_steps, start)
    assert after_term["start"] == start and term_at <= after_term["step"] < STEPS
    assert _committed(workdir)[-1] == after_term["step"]  # SIGTERM saved the step it stopped at

    final = _start(workdir, env, tmp_path / "final.json")
    final_start, _ = _finish(final)
    assert final_start == after_term["step"]
    done = json.loads((tmp_path / "final.json").read_text())
    assert done["step"] == STEPS

    records = _logged(workdir)
    assert {r["step"] for r in records} == set(range(1, STEPS + 1))
    mismatched = [(r["step"], r["train/loss"], ref["losses"][str(r["step"])]) for r in records
                  if r["train/loss"] != ref["losses"][str(r["step"])]]
    assert not mismatched, f"kill at {kill_at}: {mismatched}"
    assert done["params"] == ref["params"]
