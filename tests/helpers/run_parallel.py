"""Train the tiny model for a few steps on three meshes of the same 8 forced host devices and print JSON.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by the test before this process imports jax).
Meshes: one device; data=8; data=4 x fsdp=2. Same global batch, seed and data; the initial state is built once on
the single device and copied to the other layouts.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from flaxdiff import losses, predictors, schedules  # noqa: E402
from flaxdiff.training import DiffusionTrainer, TrainConfig, make_mesh  # noqa: E402
from helpers.tiny_model import MODEL_CONFIG, TinyDenoiser, toy_batches  # noqa: E402

STEPS = 4
BATCH = 16


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    config = TrainConfig(learning_rate=1e-2, grad_accum_steps=2, ema_decay=0.9, total_steps=STEPS)
    meshes = {"single": make_mesh(devices=jax.devices()[:1]), "data8": make_mesh(),
              "data4_fsdp2": make_mesh(fsdp=2)}
    out = {}
    host_state = None
    for name, mesh in meshes.items():
        trainer = DiffusionTrainer(TinyDenoiser(features=16), MODEL_CONFIG, schedules.get("cosine"),
                                   predictors.get("v"), losses.weightings.get("min_snr"),
                                   losses.time_samplers.get("logit_normal"), config, next(toy_batches(0, BATCH)),
                                   mesh=mesh)
        if host_state is None:
            host_state = jax.device_get(trainer.init())
        trainer.state = jax.device_put(host_state, trainer.state_shardings)
        data = toy_batches(5, BATCH)
        run_losses = [float(trainer.train_step(next(data))["loss"]) for _ in range(STEPS)]
        params = jax.device_get(trainer.state.params)
        specs = [str(leaf.sharding.spec) for leaf in jax.tree.leaves(trainer.state.params)]
        out[name] = {
            "losses": run_losses,
            "params": [np.asarray(leaf).ravel().tolist() for leaf in jax.tree.leaves(params)],
            "fsdp_sharded_leaves": sum("fsdp" in spec for spec in specs),
            "opt_fsdp_sharded_leaves": sum("fsdp" in str(leaf.sharding.spec)
                                           for leaf in jax.tree.leaves(trainer.state.opt_state)),
            "devices": len(trainer.state.step.sharding.device_set),
        }
    try:
        trainer.global_batch({"image": np.zeros((12, 8, 8, 1), np.float32)})
    except ValueError as err:
        out["batch_error"] = str(err)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
