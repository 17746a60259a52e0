"""Programs on the PATH of a simulated TPU VM worker (see tpu_fake_gcloud.py), written by ``write_worker_bin``.

- ``python3``: the image's Python 3.10 (Ubuntu 22.04): ``--version`` reports 3.10.12, the Python >= 3.11 check
  (``-c ...``) fails, and ``-m pip install --user ... uv`` installs the fake ``uv`` to ``~/.local/bin``;
- ``uv venv --seed --python V DIR``: makes DIR/bin/python, a fake Python V (logged to ``~/uv.log``) that
  records ``-m pip`` argv to ``~/pip.argv`` and runs "training": records its argv to ``~/train.argv``, prints
  a line and its pid to ``~/training.pid``; with ``$FAKE_TRAIN_BARRIER=DIR`` it waits (up to 10 s, else exits 9)
  until all ``--num-processes`` processes have started, like ``jax.distributed.initialize``; it exits 7 after
  0.3 s when its ``--process-id`` is ``$FAKE_TRAIN_FAIL_ID``, else sleeps ``$FAKE_TRAIN_SECONDS`` (default 0)
  and exits 0;
- ``sudo``: runs its arguments, with a leading ``/tmp/`` in any argument replaced by ``$HOME/tmp/``;
- ``lsof``: records its arguments to ``~/lsof.args`` and prints the pids listed in ``~/tpu-holders``;
- ``gcsfuse``: records its arguments to ``~/gcsfuse.args`` (mounts nothing).
"""

from pathlib import Path

PYTHON3 = r"""#!/bin/sh
case "$1" in
  --version) echo "Python 3.10.12"; exit 0 ;;
  -c) exit 1 ;;
  -m)
    if [ "$2" = pip ] && [ "$3" = install ] && echo " $* " | grep -q ' uv '; then
      mkdir -p "$HOME/.local/bin"
      cp "$(dirname "$0")/uv.fake" "$HOME/.local/bin/uv"
      echo "Successfully installed uv"
      exit 0
    fi ;;
esac
echo "python3 (3.10): not simulated: $*" >&2
exit 2
"""

UV = r"""#!/bin/sh
echo "uv $*" >> "$HOME/uv.log"
if [ "$1" != venv ] || [ "$2" != --seed ] || [ "$3" != --python ]; then
  echo "uv: not simulated: $*" >&2
  exit 2
fi
mkdir -p "$5/bin"
sed "s/@VERSION@/$4/" "$FAKE_GCLOUD_WORKER_PATH/venv-python.fake" > "$5/bin/python"
chmod +x "$5/bin/python"
echo "Creating virtual environment with Python $4 at: $5"
"""

VENV_PYTHON = r"""#!/bin/bash
case "$1" in
  --version) echo "Python @VERSION@"; exit 0 ;;
  -c) exit 0 ;;
  -m) printf '%s\0' "$@" > "$HOME/pip.argv"; echo "pip: $*"; exit 0 ;;
esac
printf '%s\0' "$@" > "$HOME/train.argv"
echo $$ > "$HOME/training.pid"
prev=""
for arg in "$@"; do
  if [ "$prev" = --process-id ]; then id=$arg; fi
  if [ "$prev" = --num-processes ]; then n=$arg; fi
  prev=$arg
done
echo "fake training: process $id, args $*"
if [ -n "${FAKE_TRAIN_BARRIER:-}" ]; then
  touch "$FAKE_TRAIN_BARRIER/$id"
  i=0
  while [ "$(ls "$FAKE_TRAIN_BARRIER" | wc -l)" -lt "$n" ]; do
    i=$((i + 1))
    if [ $i -gt 200 ]; then echo "process $id: not all $n processes started" >&2; exit 9; fi
    sleep 0.05
  done
fi
if [ "$id" = "${FAKE_TRAIN_FAIL_ID:-}" ]; then
  sleep 0.3
  echo "process $id crashed" >&2
  exit 7
fi
sleep "${FAKE_TRAIN_SECONDS:-0}"
echo "process $id done"
"""

SUDO = r"""#!/bin/bash
args=()
for arg in "$@"; do
  if [[ $arg == /tmp/* ]]; then
    arg=$HOME/tmp/${arg#/tmp/}
  fi
  args+=("$arg")
done
exec "${args[@]}"
"""

GCSFUSE = r"""#!/bin/sh
printf '%s\n' "$@" > "$HOME/gcsfuse.args"
echo "fake gcsfuse: mounted $*"
"""

LSOF = r"""#!/bin/sh
printf '%s\n' "$@" > "$HOME/lsof.args"
cat "$HOME/tpu-holders" 2>/dev/null
exit 0
"""


def write_worker_bin(directory: Path) -> Path:
    """Write the fake worker programs into ``directory`` and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in {"python3": PYTHON3, "uv.fake": UV, "venv-python.fake": VENV_PYTHON, "sudo": SUDO,
                       "lsof": LSOF, "gcsfuse": GCSFUSE}.items():
        path = directory / name
        path.write_text(text)
        path.chmod(0o755)
    return directory
