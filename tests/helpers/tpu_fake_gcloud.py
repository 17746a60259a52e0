"""A stand-in for ``gcloud`` used by tests/test_tpu_tools.py.

Every call appends its argv (without the program name) as one JSON array to ``$FAKE_GCLOUD_LOG``.

Without ``$FAKE_GCLOUD_WORKERS`` it only records, prints ``$FAKE_GCLOUD_DESCRIBE`` for ``describe``, copies local
files given to ``scp`` into ``$FAKE_GCLOUD_COPY_DIR`` and exits with ``$FAKE_GCLOUD_EXIT``.

With ``$FAKE_GCLOUD_WORKERS=DIR`` it simulates a TPU VM of ``$FAKE_GCLOUD_NUM_WORKERS`` (default 4) workers whose home
directories are ``DIR/worker<I>``:
- ``tpu-vm ssh --worker=W --command=C`` runs ``bash -c C`` in every selected home at once (like gcloud, which runs
  the command concurrently on all selected workers), with ``$FAKE_GCLOUD_WORKER_PATH`` first on PATH, and exits with
  the largest exit status; ``$FAKE_GCLOUD_SSH_FAIL_WORKER=I`` makes the connection to worker I fail (status 255),
  ``$FAKE_GCLOUD_SSH_DROP_WORKER=I`` drops it (status 255) once, after the first output line with " started";
- ``tpu-vm scp`` copies into the selected homes (``NAME:PATH`` destination) or back from one home
  (``NAME:PATH`` sources);
- ``tpu-vm describe --format=value(state)`` and ``queued-resources describe --format=value(state.state)`` print the
  first line of ``$FAKE_GCLOUD_STATES`` / ``$FAKE_GCLOUD_QR_STATES`` and drop it while more than one line is left;
  the network-endpoint query prints 10.0.0.2, 10.0.0.3, ...;
- ``tpu-vm delete`` and ``queued-resources delete`` remove the worker homes (the VM and its disks are gone).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REMOTE = re.compile(r"^([a-z][-a-z0-9]*):(.*)$")


def workers_of(selection: str, count: int) -> list:
    if selection == "all":
        return list(range(count))
    chosen = []
    for part in selection.split(","):
        first, _, last = part.partition("-")
        chosen.extend(range(int(first), int(last or first) + 1))
    return chosen


def option(args: list, name: str, default=None):
    for arg in args:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return default


def pop_state(path: str) -> str:
    lines = Path(path).read_text().splitlines()
    if len(lines) > 1:
        Path(path).write_text("".join(line + "\n" for line in lines[1:]))
    return lines[0]


def home(root: Path, worker: int) -> Path:
    path = root / f"worker{worker}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def ssh(args: list, root: Path, count: int) -> int:
    command = option(args, "command")
    if command is None:
        print("fake gcloud: interactive ssh is not simulated", file=sys.stderr)
        return 2
    failing = os.environ.get("FAKE_GCLOUD_SSH_FAIL_WORKER")
    dropping = os.environ.get("FAKE_GCLOUD_SSH_DROP_WORKER")
    env = dict(os.environ)
    env["PATH"] = f"{os.environ['FAKE_GCLOUD_WORKER_PATH']}{os.pathsep}{os.environ['PATH']}"
    procs = []
    for worker in workers_of(option(args, "worker", "0"), count):
        if str(worker) == failing:
            print(f"fake gcloud: ssh to worker {worker}: connection refused", file=sys.stderr)
            procs.append(None)
            continue
        worker_home = home(root, worker)
        drop = str(worker) == dropping and not (root / f"dropped{worker}").exists()
        procs.append(subprocess.Popen(["bash", "-c", command], cwd=worker_home, env=dict(env, HOME=str(worker_home)),
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if drop else None, text=True))
        if drop:  # the connection drops right after the remote side printed that it started something
            for line in procs[-1].stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                if " started" in line:
                    (root / f"dropped{worker}").touch()
                    procs[-1].kill()
                    procs[-1].wait()
                    print(f"fake gcloud: connection to worker {worker} closed", file=sys.stderr)
                    procs[-1] = None
                    break
    codes = [255 if proc is None else proc.wait() for proc in procs]
    return max(codes)


def copy(source: Path, target: str, recurse: bool) -> None:
    if Path(target).is_dir() or target.endswith("/"):
        target = Path(target) / source.name
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        if not recurse:
            raise SystemExit(f"fake gcloud: {source} is a directory (use --recurse)")
        shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        shutil.copy(source, target)


def scp(args: list, root: Path, count: int) -> int:
    paths = [a for a in args[4:] if not a.startswith("--")]
    recurse = "--recurse" in args
    *sources, dest = paths
    selection = workers_of(option(args, "worker", "0"), count)
    remote_dest = REMOTE.match(dest)
    if remote_dest:
        for worker in selection:
            target = f"{home(root, worker)}/{remote_dest.group(2)}"
            for source in sources:
                copy(Path(source), target, recurse)
        return 0
    if len(selection) != 1:
        print("fake gcloud: cannot copy back from several workers", file=sys.stderr)
        return 1
    for source in sources:
        copy(home(root, selection[0]) / REMOTE.match(source).group(2), dest, recurse)
    return 0


def main() -> int:
    args = sys.argv[1:]
    with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
        log.write(json.dumps(args) + "\n")
    workers_dir = os.environ.get("FAKE_GCLOUD_WORKERS")
    if not workers_dir:
        copy_dir = os.environ.get("FAKE_GCLOUD_COPY_DIR")
        if copy_dir and "scp" in args:
            for arg in args:
                if os.path.isfile(arg):
                    shutil.copy(arg, copy_dir)
        if "describe" in args:
            sys.stdout.write(os.environ.get("FAKE_GCLOUD_DESCRIBE", ""))
        return int(os.environ.get("FAKE_GCLOUD_EXIT", "0"))

    root = Path(workers_dir)
    count = int(os.environ.get("FAKE_GCLOUD_NUM_WORKERS", "4"))
    group, verb = args[2], args[3]
    fmt = option(args, "format")
    if verb == "ssh":
        return ssh(args, root, count)
    if verb == "scp":
        return scp(args, root, count)
    if verb == "delete":
        shutil.rmtree(root, ignore_errors=True)
        return 0
    if verb == "describe" and fmt == "value(state.state)":
        print(pop_state(os.environ["FAKE_GCLOUD_QR_STATES"]))
    elif verb == "describe" and fmt == "value(state)":
        print(pop_state(os.environ["FAKE_GCLOUD_STATES"]))
    elif verb == "describe" and fmt == "value(networkEndpoints.ipAddress)":
        print("\n".join(f"10.0.0.{2 + worker}" for worker in range(count)))
    elif verb not in ("create", "list", "describe", "start", "stop"):
        print(f"fake gcloud: {group} {verb} is not simulated", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
