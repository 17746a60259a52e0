"""Devices, processes and shardings: the ("data", "fsdp") mesh.

The batch is split on dim 0 over both axes (every device of every process gets ``global_batch / devices`` rows);
parameters and optimizer state are replicated, or with ``fsdp > 1`` sharded over the "fsdp" axis along their
largest dimension divisible by the axis size (leaves with no such dimension stay replicated). XLA inserts the
all-gathers / reduce-scatters, so the same train step serves both layouts.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

logger = logging.getLogger(__name__)

DATA_AXES = ("data", "fsdp")

__all__ = [
    "DATA_AXES",
    "DistributedStartupError",
    "initialize_distributed",
    "make_mesh",
    "batch_sharding",
    "replicated",
    "fsdp_spec",
    "tree_shardings",
    "check_global_batch",
    "make_global_batch",
]

_ENV_COORDINATOR = "FLAXDIFF_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "FLAXDIFF_NUM_PROCESSES"
_ENV_PROCESS_ID = "FLAXDIFF_PROCESS_ID"
_ENV_STARTUP_TIMEOUT = "FLAXDIFF_STARTUP_TIMEOUT"
DEFAULT_STARTUP_TIMEOUT = 30.0


class DistributedStartupError(ValueError):
    """The processes of a multi-process run did not all join in time (one line, for the user)."""


def _exit_on_timeout(message: str) -> None:
    logger.critical("%s", message)
    logging.shutdown()
    os._exit(2)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    heartbeat_timeout_seconds: int = 20,
    startup_timeout: float | None = None,
    on_startup_timeout: Callable[[str], None] | None = None,
) -> bool:
    """Join a multi-process run through ``jax.distributed.initialize``; returns True if it was initialised.

    Explicit arguments win; missing ones are read from FLAXDIFF_COORDINATOR_ADDRESS / FLAXDIFF_NUM_PROCESSES /
    FLAXDIFF_PROCESS_ID. With none of them and ``auto=True`` (TPU pods, SLURM, Open MPI), JAX detects the cluster
    itself. Otherwise (one process) nothing happens.

    Bounded waits: when the processes have not all joined within ``startup_timeout`` seconds (default 30, or
    $FLAXDIFF_STARTUP_TIMEOUT), every started process ends: a watchdog calls ``on_startup_timeout(message)`` with one
    line naming the coordinator, this process id and the expected count (default: log it and ``os._exit(2)``; JAX's
    own client would abort the process with a stack trace a little later). A peer that stops answering mid-run makes
    the others abort after ``heartbeat_timeout_seconds`` instead of hanging.
    """
    coordinator_address = coordinator_address or os.environ.get(_ENV_COORDINATOR)
    if num_processes is None and os.environ.get(_ENV_NUM_PROCESSES):
        num_processes = int(os.environ[_ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(_ENV_PROCESS_ID):
        process_id = int(os.environ[_ENV_PROCESS_ID])
    if startup_timeout is None:
        startup_timeout = float(os.environ.get(_ENV_STARTUP_TIMEOUT, DEFAULT_STARTUP_TIMEOUT))
    if not (isinstance(startup_timeout, (int, float)) and np.isfinite(startup_timeout) and startup_timeout >= 1):
        raise ValueError(f"startup timeout {startup_timeout!r} is invalid; accepted: a number of seconds >= 1")
    timeout = int(np.ceil(startup_timeout))
    explicit = (coordinator_address, num_processes, process_id)
    if any(value is not None for value in explicit):
        if any(value is None for value in explicit):
            raise ValueError(
                f"multi-process run needs coordinator_address, num_processes and process_id together; got "
                f"coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
                f"process_id={process_id!r}"
            )
        if not num_processes >= 1:
            raise ValueError(f"num_processes={num_processes} is invalid; accepted: an integer >= 1")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} is outside [0, num_processes={num_processes})")
        message = (f"process {process_id} could not join the {num_processes}-process run at coordinator "
                   f"{coordinator_address} within {timeout} s; start every process with the same "
                   f"--coordinator-address and --num-processes, or raise --startup-timeout")
        joined = threading.Event()

        def watchdog() -> None:
            if not joined.wait(timeout):
                (on_startup_timeout or _exit_on_timeout)(message)

        threading.Thread(target=watchdog, name="flaxdiff-startup-watchdog", daemon=True).start()
        try:
            # JAX's own deadline is a backstop behind the watchdog (it aborts the process when it expires)
            jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                       process_id=process_id, initialization_timeout=timeout + 30,
                                       heartbeat_timeout_seconds=heartbeat_timeout_seconds)
        except Exception as err:  # noqa: BLE001 - jax raises runtime errors of several types here
            raise DistributedStartupError(f"{message} ({type(err).__name__})") from None
        finally:
            joined.set()
    elif auto:
        jax.distributed.initialize(initialization_timeout=timeout,
                                   heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    else:
        return False
    logger.info("process %d of %d joined; %d local / %d global devices", jax.process_index(), jax.process_count(),
                jax.local_device_count(), jax.device_count())
    return True


def make_mesh(fsdp: int = 1, data: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh over ``devices`` (default: every device of every process), both axes Auto.

    data defaults to len(devices) / fsdp; data * fsdp must equal the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    if fsdp < 1 or count % fsdp:
        raise ValueError(f"fsdp={fsdp} does not divide the {count} devices; use a divisor of {count}")
    if data is None:
        data = count // fsdp
    if data * fsdp != count:
        raise ValueError(f"mesh shape (data={data}, fsdp={fsdp}) has {data * fsdp} slots but there are {count} "
                         f"devices; data * fsdp must equal {count}")
    grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return Mesh(grid, DATA_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Dim 0 split over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> P:
    """PartitionSpec sharding the largest dim divisible by ``fsdp_size`` over "fsdp" (ties: the last such dim)."""
    if fsdp_size <= 1 or not shape:
        return P()
    best = None
    for dim, size in enumerate(shape):
        if size % fsdp_size == 0 and size >= fsdp_size and (best is None or size >= shape[best]):
            best = dim
    if best is None:
        return P()
    spec: list[Any] = [None] * len(shape)
    spec[best] = "fsdp"
    return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, fsdp: bool) -> Any:
    """NamedShardings for every leaf of ``tree`` (arrays or ShapeDtypeStructs): fsdp-sharded or replicated."""
    size = mesh.shape["fsdp"] if fsdp else 1
    return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(np.shape(leaf), size)), tree)


def check_global_batch(global_batch: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
    """Raise if the global batch cannot be split over the devices and micro-batches."""
    devices = mesh.devices.size
    if global_batch % (devices * grad_accum_steps):
        raise ValueError(
            f"global batch {global_batch} is not divisible by device count {devices} x grad_accum_steps "
            f"{grad_accum_steps}; use a multiple of {devices * grad_accum_steps}"
        )


def make_global_batch(local_batch: Mapping[str, Any], mesh: Mesh, grad_accum_steps: int = 1
                      ) -> dict[str, jax.Array]:
    """Assemble global arrays from this process's rows (``jax.make_array_from_process_local_data``).

    Every process passes its own ``batch_size_per_process`` rows; the global batch is their concatenation in
    process order, sharded on dim 0 over ("data", "fsdp"). Its B_local x process_count rows must split over the
    devices x ``grad_accum_steps`` micro-batches (:func:`check_global_batch`).
    """
    sharding = batch_sharding(mesh)
    out = {}
    for name, value in local_batch.items():
        value = np.asarray(value)
        global_rows = value.shape[0] * jax.process_count()
        check_global_batch(global_rows, mesh, grad_accum_steps)
        out[name] = jax.make_array_from_process_local_data(sharding, value, (global_rows,) + value.shape[1:])
    return out


def shard_rows(tree: Any, mesh: Mesh | None) -> tuple[Any, int]:
    """``(tree placed on the mesh, pad)`` for inference on rows held by this process: dim 0 of every leaf is padded
    with ``pad = -B % devices`` copies of its last row (B = rows of the first leaf) and split over ("data", "fsdp").
    Without a mesh or on one device the tree is returned as it is, with pad 0; drop the last ``pad`` output rows."""
    leaves = jax.tree_util.tree_leaves(tree)
    if mesh is None or mesh.size == 1 or not leaves:
        return tree, 0
    pad = -np.shape(leaves[0])[0] % mesh.size
    sharding = batch_sharding(mesh)

    def place(leaf: Any) -> jax.Array:
        leaf = leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
        if pad:
            leaf = jnp.concatenate([leaf, jnp.repeat(leaf[-1:], pad, axis=0)], axis=0)
        return jax.device_put(leaf, sharding)

    return jax.tree_util.tree_map(place, tree), pad
