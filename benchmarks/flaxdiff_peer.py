"""Run FlaxDiff 0.2.11 (the PyPI package, also named ``flaxdiff``) in its own virtualenv, side by side with ours.

The peer lives in a separate venv (never in the project's):

    python3 -m venv /path/to/peer_venv && /path/to/peer_venv/bin/pip install flaxdiff==0.2.11

and is found through ``--peer-venv DIR`` or the ``FLAXDIFF_PEER_VENV`` environment variable; without either the
benchmarks print a note and skip the peer side. Both packages are called ``flaxdiff``: inside the peer venv this
module imports FlaxDiff 0.2.11 first, re-registers its modules as ``peer_flaxdiff.*`` and only then puts this
repository on ``sys.path`` so that ``import flaxdiff`` gives ours (the jax/flax versions of the two venvs match:
jax 0.10.2, flax 0.12.8). Each task prints one JSON line; the caller (``run_peer``) parses the last line.

    <peer_venv>/bin/python benchmarks/flaxdiff_peer.py sampling '{"batch": 16, "steps": 20}'
    <peer_venv>/bin/python benchmarks/flaxdiff_peer.py train '{"config": "medium", "batch": 32}'
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from _common import load_average

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_VERSION = "0.2.11"
CREATE_HINT = ("python3 -m venv PEER_VENV && PEER_VENV/bin/pip install flaxdiff==0.2.11 (any directory); then pass "
               "--peer-venv PEER_VENV or set FLAXDIFF_PEER_VENV")

# FlaxDiff Unet configurations. "medium" is the Unet(feature_depths=(64, 128, 256), num_res_blocks=2,
# emb_features=256): with attention at the two lower resolutions (8 heads) and a 256-wide text context it has
# 9.31M parameters. "tiny" is a small two-level config.
PEER_UNETS = {
    "medium": {"feature_depths": (64, 128, 256), "num_res_blocks": 2, "emb_features": 256,
               "attention_configs": (None, {"heads": 8}, {"heads": 8}), "context": 256},
    "tiny": {"feature_depths": (32, 64), "num_res_blocks": 1, "emb_features": 64,
             "attention_configs": (None, {"heads": 4}), "context": 64},
}
# FlaxDiff SimpleDiT configurations (32x32x4 inputs, patch 2, width 384, 6 heads, as DiT-S/2). Its time embedding
# (Fourier -> 1536-wide MLP -> 384) and text projection carry ~2.7M more parameters than ours, so at 12 blocks it has
# 35.6M against our DiT-S/2's 32.9M (8% apart); with 11 blocks it has 33.0M (within 1%), at ~8% fewer FLOPs per image
# than our 12-block model.
PEER_DITS = {
    "dit-s2": {"patch_size": 2, "emb_features": 384, "num_layers": 11, "num_heads": 6, "output_channels": 4,
               "context": 384, "channels": 4},
    # the MNIST main job's DiT (4x4 patches, width 128, 32x32x1): 5 blocks give 1.90M against our 6-block 1.85M
    "dit-p4": {"patch_size": 4, "emb_features": 128, "num_layers": 5, "num_heads": 4, "output_channels": 1,
               "context": 128, "channels": 1},
}
PEER_MODELS = sorted(PEER_UNETS) + sorted(PEER_DITS)


# ---------------------------------------------------------------------------------------------------------------
# Caller side (runs in the project's venv)
# ---------------------------------------------------------------------------------------------------------------

def find_peer_python(peer_venv: str | None) -> str | None:
    """The peer venv's python, from the flag or FLAXDIFF_PEER_VENV; None (with a printed note) when absent."""
    venv = peer_venv or os.environ.get("FLAXDIFF_PEER_VENV")
    if not venv:
        print(f"note: FlaxDiff {PEER_VERSION} side skipped (no --peer-venv / FLAXDIFF_PEER_VENV). To add it: "
              f"{CREATE_HINT}", flush=True)
        return None
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        print(f"note: FlaxDiff {PEER_VERSION} side skipped: {python} does not exist. To create it: {CREATE_HINT}",
              flush=True)
        return None
    return python


def run_peer(python: str, task: str, options: dict[str, Any], env: dict[str, str] | None = None,
             timeout: float = 3600.0) -> dict[str, Any]:
    """Run ``task`` in the peer venv (a fresh process) and return its JSON result."""
    child_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    child_env.update(env or {})
    proc = subprocess.run([python, os.path.abspath(__file__), task, json.dumps(options)], capture_output=True,
                          text=True, env=child_env, timeout=timeout, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"peer task {task!r} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------------------------
# Peer side (runs in the peer venv)
# ---------------------------------------------------------------------------------------------------------------

def _import_both() -> Any:
    """Import FlaxDiff 0.2.11 as ``peer_flaxdiff``, then make ``import flaxdiff`` resolve to this repository."""
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") not in (REPO, os.path.dirname(__file__))]
    import importlib
    import importlib.util
    import types

    # FlaxDiff's simple_dit imports its Hilbert-curve helpers, which import matplotlib for a plotting function only
    if importlib.util.find_spec("matplotlib") is None:
        for name in ("matplotlib", "matplotlib.pyplot", "matplotlib.colors"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["matplotlib.colors"].LinearSegmentedColormap = None
    for name in ("flaxdiff", "flaxdiff.models.simple_unet", "flaxdiff.models.simple_dit", "flaxdiff.samplers",
                 "flaxdiff.schedulers", "flaxdiff.predictors", "flaxdiff.utils", "flaxdiff.trainer.diffusion_trainer"):
        importlib.import_module(name)
    peer = {}
    for name in [n for n in sys.modules if n == "flaxdiff" or n.startswith("flaxdiff.")]:
        module = sys.modules.pop(name)
        peer[name] = module
        sys.modules["peer_" + name] = module
    sys.path.insert(0, REPO)
    import flaxdiff

    if os.path.dirname(os.path.dirname(os.path.abspath(flaxdiff.__file__))) != REPO:
        raise RuntimeError(f"expected our flaxdiff from {REPO}, got {flaxdiff.__file__}")
    return peer


def _environment() -> dict[str, Any]:
    import flax
    import jax

    return {"jax": jax.__version__, "flax": flax.__version__, "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(), "devices": jax.device_count(), "load_avg": list(load_average())}


def _peer_unet(peer: dict, name: str) -> tuple[Any, int]:
    config = dict(PEER_UNETS[name])
    context = config.pop("context")
    return peer["flaxdiff.models.simple_unet"].Unet(**config), context


def _peer_model(peer: dict, name: str) -> tuple[Any, int, int]:
    """(module, text-context width, image channels) of a PEER_UNETS or PEER_DITS entry."""
    if name in PEER_UNETS:
        return _peer_unet(peer, name) + (3,)
    config = dict(PEER_DITS[name])
    context, channels = config.pop("context"), config.pop("channels")
    return peer["flaxdiff.models.simple_dit"].SimpleDiT(**config), context, channels


def _median_time(fn, repeats: int) -> float:
    import numpy as np

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def task_sampling(options: dict[str, Any]) -> dict[str, Any]:
    """FlaxDiff's DDIM loop vs ours (flaxdiff.samplers.sample_model, ddim), same Unet + params, and a zero network."""
    peer = _import_both()
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flaxdiff import samplers, schedules, timesteps

    batch, steps, size, repeats = options["batch"], options["steps"], options["size"], options["repeats"]
    pf_samplers = peer["flaxdiff.samplers"]
    pf_sched = peer["flaxdiff.schedulers"]
    pf_pred = peer["flaxdiff.predictors"]
    pf_inputs = sys.modules["peer_flaxdiff.inputs"]
    unet, context = _peer_unet(peer, options.get("unet", "medium"))

    class ZeroNet(nn.Module):
        """A network that costs nothing: F = 0 (the sampler's arithmetic is all that remains)."""

        @nn.compact
        def __call__(self, x, temb, textcontext):
            return jnp.zeros_like(x)

    text = jnp.zeros((batch, 1, context), jnp.float32)
    params = unet.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1,)),
                       jnp.zeros((1, 1, context)))
    n_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    schedule = pf_sched.CosineNoiseScheduler(1000)
    input_config = pf_inputs.DiffusionInputConfig(sample_data_key="image", sample_data_shape=(size, size, 3),
                                                  conditions=[])
    results = {"environment": _environment(), "params": n_params, "batch": batch, "steps": steps, "size": size,
               "unet_config": options.get("unet", "medium"), "slope_steps": options["slope_steps"]}
    cosine = schedules.get("cosine")
    for label, module, module_params in (("unet", unet, params), ("zero", ZeroNet(), {})):
        # FlaxDiff 0.2.11: DDIMSampler.generate_samples, a Python loop over a jitted network call with the update
        # arithmetic run op by op; 'steps' network evaluations.
        sampler = pf_samplers.DDIMSampler(module, schedule, pf_pred.EpsilonPredictionTransform(), input_config)

        def peer_run(n_steps, sampler=sampler, module=module, module_params=module_params):
            out = sampler.generate_samples(module_params, num_samples=batch, resolution=size,
                                           diffusion_steps=n_steps, model_conditioning_inputs=(text,))
            out.block_until_ready()

        # Ours: the same module.apply with the same params as the denoiser network, DDIM on the same cosine schedule,
        # the whole loop in one lax.scan under one jit. grid="uniform" builds the grid on every call;
        # a precomputed grid array isolates the compiled loop.
        def apply_fn(p, x, c_noise, cond, module=module):
            return module.apply(p, x, c_noise, cond["text"])

        noise = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, 3))

        row = {"peer_nfe": steps}
        for n_steps in ([steps] if label == "unet" else [steps, options["slope_steps"]]):
            peer_run(n_steps)
            row[f"flaxdiff_0_2_11_s@{n_steps}"] = _median_time(lambda: peer_run(n_steps), repeats)
            for precomputed, key in ((False, "ours_s"), (True, "ours_pregrid_s")):
                grid = timesteps.get("uniform", n_steps, schedule=cosine) if precomputed else "uniform"
                nfe = _ours_call(samplers, apply_fn, module_params, noise, text, grid, n_steps)
                row[f"ours_nfe@{n_steps}"] = nfe
                row[f"{key}@{n_steps}"] = _median_time(
                    lambda: _ours_call(samplers, apply_fn, module_params, noise, text, grid, n_steps), repeats)
        results[label] = row
    results["load_avg_end"] = list(load_average())
    return results


def _ours_call(samplers, apply_fn, params, noise, text, grid, steps) -> int:
    out, nfe = samplers.sample_model(apply_fn, params, "cosine", "epsilon", noise=noise, cond={"text": text},
                                     sampler="ddim", steps=steps, grid=grid)
    out.block_until_ready()
    return int(nfe)


def _peer_train_step(peer: dict, unet: Any, batch: int, context: int):
    """FlaxDiff 0.2.11's DiffusionTrainer train step (non-distributed, no autoencoder, no dynamic scale), line for line.

    One change: its condition dropout ``concatenate([null[:n], labels[n:]])`` slices with a traced n, which jax 0.10
    rejects inside jit ("Slice entries must be static integers"); here it is the same selection written as
    ``where(arange(B) < n, null, labels)``. Everything else (cosine schedule, epsilon target, l2 loss, Adam,
    EMA 0.999, batch donated) is as in its source.
    """
    import jax
    import jax.numpy as jnp
    import optax

    schedulers = peer["flaxdiff.schedulers"]
    noise_schedule = schedulers.CosineNoiseScheduler(1000)
    transform = peer["flaxdiff.predictors"].EpsilonPredictionTransform()
    markov = peer["flaxdiff.utils"].RandomMarkovState
    coeff_shape = schedulers.get_coeff_shapes_tuple
    null_labels = jnp.broadcast_to(jnp.zeros((1, context), jnp.float16), (batch, 1, context))

    def train_step(train_state, rng_state, data, local_device_index):
        rng_state, subkey = rng_state.get_random_key()
        local = markov(jax.random.fold_in(subkey, local_device_index.reshape()))
        images = (jnp.array(data["image"], dtype=jnp.float32) - 127.5) / 127.5
        label_seq = data["text"]
        local, uncond_key = local.get_random_key()
        uncond_mask = jax.random.bernoulli(uncond_key, shape=(images.shape[0],), p=0.12)
        num_unconditional = jnp.sum(uncond_mask).astype(jnp.int32)
        keep_null = (jnp.arange(images.shape[0]) < num_unconditional)[:, None, None]
        label_seq = jnp.where(keep_null, null_labels.astype(label_seq.dtype), label_seq)
        noise_level, local = noise_schedule.generate_timesteps(images.shape[0], local)
        local, rngs = local.get_random_key()
        noise = jax.random.normal(rngs, shape=images.shape, dtype=jnp.float32)
        rates = noise_schedule.get_rates(noise_level, coeff_shape(images))
        noisy_images, c_in, expected_output = transform.forward_diffusion(images, noise, rates)

        def model_loss(params):
            preds = unet.apply(params, *noise_schedule.transform_inputs(noisy_images * c_in, noise_level), label_seq)
            preds = transform.pred_transform(noisy_images, preds, rates)
            nloss = optax.l2_loss(preds, expected_output)
            nloss *= noise_schedule.get_weights(noise_level, coeff_shape(nloss))
            return jnp.mean(nloss)

        loss, grads = jax.value_and_grad(model_loss)(train_state.params)
        new_state = train_state.apply_gradients(grads=grads).apply_ema(0.999)
        return new_state, loss, rng_state

    return jax.jit(train_step, donate_argnums=(2,))


def task_train(options: dict[str, Any]) -> dict[str, Any]:
    """FlaxDiff 0.2.11's train step (see ``_peer_train_step``) for its Unet or SimpleDiT, jitted as it jits it."""
    peer = _import_both()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    trainer_mod = peer["flaxdiff.trainer.diffusion_trainer"]
    utils = peer["flaxdiff.utils"]
    batch, size, repeats = options["batch"], options["size"], options["repeats"]
    unet, context, channels = _peer_model(peer, options["config"])
    params = unet.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels)), jnp.zeros((1,)),
                       jnp.zeros((1, 1, context)))
    n_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    state = trainer_mod.TrainState.create(apply_fn=unet.apply, params=params, ema_params=params,
                                          tx=optax.adam(1e-4), rngs=jax.random.PRNGKey(1),
                                          metrics=trainer_mod.Metrics.empty(), dynamic_scale=None)
    train_step = _peer_train_step(peer, unet, batch, context)
    rng = np.random.default_rng(0)

    def make_batch():
        return {"image": jnp.asarray(rng.uniform(0, 255, (batch, size, size, channels)).astype(np.float32)),
                "text": jnp.asarray(rng.normal(size=(batch, 1, context)).astype(np.float32))}

    rng_state = utils.RandomMarkovState(jax.random.PRNGKey(2))
    index = jnp.zeros((), jnp.int32)
    compiled = train_step.lower(state, rng_state, make_batch(), index).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0))
    state, loss, rng_state = train_step(state, rng_state, make_batch(), index)
    jax.block_until_ready(loss)
    times = []
    for _ in range(repeats):
        data = make_batch()
        jax.block_until_ready(data)
        start = time.perf_counter()
        state, loss, rng_state = train_step(state, rng_state, data, index)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    step_time = float(np.median(times))
    kind = "unet" if options["config"] in PEER_UNETS else "simpledit"
    return {"environment": _environment(), "model": f"flaxdiff-0.2.11-{kind}-{options['config']}",
            "config": dict({**PEER_UNETS, **PEER_DITS}[options["config"]]), "params": n_params, "batch": batch,
            "shape": [size, size, channels], "step_time_s": step_time, "images_per_s": batch / step_time,
            "train_gflop_per_image": flops / batch / 1e9, "achieved_gflops": flops / step_time / 1e9,
            "loss_finite": bool(np.isfinite(float(loss)))}


TASKS = {"sampling": task_sampling, "train": task_train}

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in TASKS:
        raise SystemExit(f"usage: flaxdiff_peer.py {{{','.join(TASKS)}}} '<json options>'")
    print(json.dumps(TASKS[sys.argv[1]](json.loads(sys.argv[2]))), flush=True)
