# %% [markdown]
# # 6. Multi-device and multi-host training: the mesh, what the trainer shards, launching on TPU VMs
#
# flaxdiff trains with **one** jitted step function; what changes between a laptop CPU, eight TPU cores and a pod
# of many hosts is only the *mesh* the arrays are laid out on. This notebook shows the mesh, what
# `DiffusionTrainer` shards and how, runs the same training step on 8 simulated devices in two layouts, and shows
# how `training.py` and the `tpu` command line tool launch a multi-host run.
#
# **Fast mode:** `FLAXDIFF_TUTORIAL_FAST=1` (fewer steps in the 8-device run).

# %%
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import matplotlib.pyplot as plt
import numpy as np

from flaxdiff import models
from flaxdiff.training import make_mesh, parallel
from tutorial_utils import pick, setup_plots

setup_plots()
REPO = pathlib.Path.cwd().parent

# %% [markdown]
# ## The mesh
#
# A `jax.sharding.Mesh` arranges devices in a grid with named axes. flaxdiff uses two, `("data", "fsdp")`, with
# $\text{data} \times \text{fsdp} = $ number of devices (of all processes):
#
# * **the batch** is split along its first dimension over *both* axes: each of the $n$ devices holds
#   $B / n$ rows (`PartitionSpec(("data", "fsdp"))`);
# * **parameters, optimizer state and EMA** are replicated when `fsdp = 1` (pure data parallelism). With
#   `fsdp = k > 1` each leaf is split over the `"fsdp"` axis along its largest dimension divisible by $k$
#   (ZeRO-3 / FSDP), so each device stores $\approx 1/k$ of the model and the optimizer;
# * XLA inserts the collectives: all-gathers of sharded weights before use and a reduce(-scatter) of gradients —
#   the step function itself contains no communication code.
#
# The gradient is the mean over the global batch, so every layout computes the same update (up to float rounding).
# On this machine there is one CPU device:

# %%
mesh = make_mesh()
print("devices:", jax.devices())
print("mesh:", dict(mesh.shape), "axis names:", mesh.axis_names)

# %% [markdown]
# Which parameter dimension would be sharded with `fsdp = 4`? `parallel.fsdp_spec` is the rule the trainer applies
# to every leaf (it is a pure function of the shape, so we can inspect it without 4 devices):

# %%
model = models.get("dit-tiny", num_classes=10)
params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 1), np.float32),
                                           np.zeros((1,), np.float32), {"label": np.zeros((1,), np.int32)}))["params"]
leaves = jax.tree_util.tree_leaves_with_path(params)
total = sum(int(np.prod(leaf.shape)) for _, leaf in leaves)
sharded = 0
print(f"{'parameter':58s} {'shape':>14s}  spec with fsdp=4")
for path, leaf in leaves:
    spec = parallel.fsdp_spec(leaf.shape, 4)
    sharded += int(np.prod(leaf.shape)) if any(axis is not None for axis in spec) else 0
    if "blocks_1" not in jax.tree_util.keystr(path) and len(leaf.shape) >= 2:
        print(f"{jax.tree_util.keystr(path)[:58]:58s} {str(leaf.shape):>14s}  {spec}")
replicated = [jax.tree_util.keystr(path) for path, leaf in leaves
              if all(axis is None for axis in parallel.fsdp_spec(leaf.shape, 4))]
print(f"\n{sharded / total:.1%} of the {total:,} parameters are sharded over 'fsdp'; replicated leaves (no dimension "
      f"divisible by 4): {replicated or 'none'}")

# %% [markdown]
# ## Eight devices, two layouts, one step function
#
# XLA can pretend the CPU is several devices: `XLA_FLAGS=--xla_force_host_platform_device_count=8` (it must be set
# before JAX starts, so this runs in a subprocess). The script trains the same tiny DiT from the same seed on the
# same batches with three meshes — 1 device, `data=8`, and `data=4 × fsdp=2` — and reports the loss curves and where
# the arrays live.

# %%
script = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    from flaxdiff import losses, models, predictors, schedules
    from flaxdiff.training import DiffusionTrainer, TrainConfig, make_mesh

    steps = int(sys.argv[1])
    rng = np.random.default_rng(0)
    data = [{"image": rng.uniform(-1, 1, (32, 16, 16, 1)).astype(np.float32),
             "label": rng.integers(0, 10, 32).astype(np.int32)} for _ in range(steps)]
    report = {"devices": jax.device_count()}
    for name, mesh in [("1 device", make_mesh(devices=jax.devices()[:1])), ("data=8", make_mesh()),
                       ("data=4 x fsdp=2", make_mesh(fsdp=2))]:
        trainer = DiffusionTrainer(
            models.get("dit-tiny", num_classes=10, depth=1), None, schedules.get("rectified_flow"),
            predictors.get("velocity"), losses.weightings.get("uniform"), losses.time_samplers.get("uniform"),
            TrainConfig(learning_rate=1e-3, ema_decay=0.9, fsdp=mesh.shape["fsdp"]), data[0], mesh=mesh)
        report[name] = {"loss": [float(trainer.train_step(batch)["loss"]) for batch in data]}
        kernel = trainer.state.params["blocks_0"]["mlp_fc1"]["kernel"]
        batch = trainer.global_batch(data[0])["image"]
        report[name]["batch"] = f"{batch.shape} {batch.sharding.spec}: rows per device " \\
            f"{sorted({s.data.shape[0] for s in batch.addressable_shards})}"
        report[name]["kernel"] = f"{kernel.shape} {kernel.sharding.spec}: per device " \\
            f"{sorted({s.data.shape for s in kernel.addressable_shards})}"
    print(json.dumps(report))
''')
flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
result = subprocess.run([sys.executable, "-c", script, str(pick(40, 3))], env=env, capture_output=True, text=True,
                        check=False)
if result.returncode:
    raise RuntimeError(result.stderr[-3000:])
report = json.loads(result.stdout.strip().splitlines()[-1])
print("devices in the subprocess:", report["devices"])
for name in ["1 device", "data=8", "data=4 x fsdp=2"]:
    print(f"\n{name}\n  batch  {report[name]['batch']}\n  weight {report[name]['kernel']}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
base = np.asarray(report["1 device"]["loss"])
for name, style in [("1 device", "-"), ("data=8", "--"), ("data=4 x fsdp=2", ":")]:
    loss = np.asarray(report[name]["loss"])
    axes[0].plot(loss, style, label=name)
    if name != "1 device":
        axes[1].plot(np.abs(loss - base) + 1e-12, style, label=name)
axes[0].set_title("training loss, same seed and batches")
axes[0].set_xlabel("step")
axes[0].legend(fontsize=7)
axes[1].set_yscale("log")
axes[1].set_title("|loss - loss on 1 device|")
axes[1].set_xlabel("step")
fig.tight_layout()
plt.show()

# %% [markdown]
# The three curves coincide; the differences are float32 rounding from summing the gradient in a different order.
#
# ## Several processes
#
# On a TPU pod each host runs one Python process that sees only its local chips. The processes join through
# `jax.distributed.initialize` (flaxdiff: `training.initialize_distributed`, or `training.py`'s
# `--coordinator-address HOST:PORT --num-processes N --process-id I`, or the `FLAXDIFF_COORDINATOR_ADDRESS` /
# `FLAXDIFF_NUM_PROCESSES` / `FLAXDIFF_PROCESS_ID` variables). After that `jax.devices()` lists *every* chip, the
# mesh spans all hosts, and each process
#
# 1. reads only its own shard of the data (`flaxdiff.data.make_loader` shards by `jax.process_index()`),
#    `batch_size / N` rows per step;
# 2. hands them to `trainer.train_step`, which assembles the global batch with
#    `jax.make_array_from_process_local_data` (`parallel.make_global_batch`);
# 3. runs the identical jitted step; checkpoints are written collectively by orbax.
#
# `training.py` is the single entry point for all of this. `--print-config` shows the resolved settings:

# %%
printed = subprocess.run([sys.executable, str(REPO / "training.py"), "--dataset", "mnist", "--model", "unet-small",
                          "--batch-size", "256", "--fsdp", "2", "--steps", "20000", "--print-config"],
                         capture_output=True, text=True, check=True, cwd=REPO)
settings = json.loads(printed.stdout)  # nested by section: data, model, diffusion, train, sample, task
shown = ["data.dataset", "model.name", "model.options", "diffusion.schedule", "diffusion.predictor",
         "train.batch_size", "train.fsdp", "train.steps", "train.learning_rate"]
print(json.dumps({key: settings[key.split(".")[0]][key.split(".")[1]] for key in shown}, indent=1))

# %% [markdown]
# ## Launching on TPU VMs with `tpu-tools`
#
# `tpu-tools/tpu` wraps `gcloud`: `create` a (Spot) slice, `setup` gives every host a Python 3.12 venv (made with
# `uv`; the TPU images ship Python 3.10) and installs this checkout and `jax[tpu]` into it, `train` starts
# `training.py` on all workers at once with the coordinator (worker 0's internal IP), the number of processes and
# each process id filled in, `logs` follows every worker's log, `reset` frees the TPU, `recreate` brings a preempted
# Spot slice back and resumes, `delete` stops paying. Every subcommand has `--dry-run`, which prints the `gcloud` commands instead of
# running them (no gcloud or cloud project needed). For a v4-32 (4 hosts × 4 chips):

# %%
tpu = str(REPO / "tpu-tools" / "tpu")
common = ["--name", "flaxdiff-v4-32", "--zone", "us-central2-b", "--project", "my-project", "--dry-run"]
for command in (["create", "--accelerator-type", "v4-32", "--spot"], ["setup", "."],
                ["train", "--accelerator-type", "v4-32", "--", "--dataset", "mnist", "--model", "unet-small",
                 "--batch-size", "256", "--workdir", "gs-bucket-mount/runs/mnist"]):
    argv = [command[0], *common, *command[1:]]
    shown = subprocess.run([tpu, *argv], capture_output=True, text=True, check=True, cwd=REPO)
    print(f"$ tpu {' '.join(argv)}")
    for line in (shown.stdout + shown.stderr).strip().splitlines()[:3]:
        print("   ", line if len(line) < 400 else line[:400] + " ...")
    print()

# %% [markdown]
# Each `train` line is one `ssh` per worker, all running at once, that starts
# `VENV/bin/python training.py --coordinator-address WORKER0_IP:8476 --num-processes 4 --process-id I ...` in its
# own session, with its log in `~/flaxdiff-logs/train.log`; when one worker fails, `tpu train` stops the others. Because every process runs the same program on its own data shard and the
# mesh spans all 16 chips, nothing else about the run changes. See `tpu-tools/README.md` for the full walk-through.
