# %% [markdown]
# # 3. Rectified flow and reflow: straight paths and few-step generation
#
# Rectified flow (Liu et al. 2022; also "flow matching", Lipman et al. 2022) is the simplest diffusion of all:
# the noisy sample is a straight line between data and noise,
#
# $$x_t = (1 - t)\, x_0 + t\, \varepsilon, \qquad t \in [0, 1],$$
#
# i.e. $\alpha = 1 - t$, $\sigma = t$ (`schedules.get("rectified_flow")`). The network regresses the velocity of
# that line, $u = dx_t/dt = \varepsilon - x_0$ (`predictors.get("velocity")`), and sampling integrates the ODE
# $dx/dt = v_\theta(x, t)$ from $t = 1$ to $0$. Each *training* path is straight, but the learned flow averages
# all lines through a point, $v(x, t) = \mathbb E[\varepsilon - x_0 \mid x_t = x]$, so its paths bend where lines
# cross. **Reflow** straightens them: sample noise–data pairs $(\varepsilon, \hat x_0)$ with the learned ODE, then
# train a new flow on the straight lines between *those* pairs. Lines of a deterministic coupling do not cross,
# so the new flow is straighter and few Euler steps suffice.
#
# **Fast mode:** `FLAXDIFF_TUTORIAL_FAST=1` (tiny step counts; committed outputs are from a full run).

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from flaxdiff import losses, models, objectives, predictors, samplers, schedules
from flaxdiff.training import DiffusionTrainer, TrainConfig, Trainer
from tutorial_utils import FAST_DIT, MLPDenoiser, batches, fit, image_dataset, mmd, pick, ring_of_gaussians, scatter, \
    setup_plots, show_grids, smooth

setup_plots()
schedule = schedules.get("rectified_flow")
velocity = predictors.get("velocity")
weighting = losses.weightings.get("uniform")
time_sampler = losses.time_samplers.get("logit_normal")      # SD3: t = sigmoid(n), more weight mid-path

# %% [markdown]
# ## 1-rectified flow on 2D data

# %%
points, _ = ring_of_gaussians(jax.random.PRNGKey(0), 20000)
config_2d = TrainConfig(learning_rate=2e-3, warmup_steps=pick(100, 5), lr_decay="cosine", ema_decay=0.995,
                        total_steps=pick(3000, 150))
trainer_2d = DiffusionTrainer(MLPDenoiser(), {"name": "mlp"}, schedule, velocity, weighting, time_sampler,
                              config_2d, {"image": points[:512]})
fit(trainer_2d, batches({"image": points}, 512), config_2d.total_steps)
apply_2d = trainer_2d.apply_fn(False)
flow_1 = trainer_2d.state.ema_params


@jax.jit
def velocity_field(params, x, t):
    """v_theta(x, t) = raw network output of the velocity predictor at time t."""
    level = predictors.noise_level(schedule, jnp.full((x.shape[0],), t))
    return apply_2d(params, velocity.network_input(x, level), velocity.c_noise(level), None)


def euler_paths(params, noise, steps):
    """Euler on dx/dt = v from t = 1 to 0; returns every intermediate x."""
    ts = np.linspace(1.0, 0.0, steps + 1)
    path = [noise]
    for t, t_next in zip(ts[:-1], ts[1:]):
        path.append(path[-1] + (t_next - t) * velocity_field(params, path[-1], t))
    return np.stack([np.asarray(p) for p in path])


noise_2d = jax.random.normal(jax.random.PRNGKey(1), (2000, 2))
paths_1 = euler_paths(flow_1, noise_2d[:300], 50)

# %% [markdown]
# ## Reflow, with the library's pieces
#
# 1. Draw noise $\varepsilon$ and solve the ODE of flow 1 accurately (`samplers.sample_model`, DPM-Solver++(2M),
#    25 steps) to get $\hat x_0 = \Phi_1(\varepsilon)$.
# 2. Train flow 2 (initialised from flow 1) with the same loss, except that the noise in
#    $x_t = (1-t)\hat x_0 + t\varepsilon$ is the *paired* $\varepsilon$, not a fresh draw:
#    $\ \mathcal L = \mathbb E_t \| v_\theta(x_t, t) - (\varepsilon - \hat x_0) \|^2$.
#
# That is `objectives.ReflowLoss`: `losses.diffusion_loss` with the noise taken from the batch's `"noise"` entry
# instead of a fresh draw. The trainer is given that loss, and starts from flow 1's params.

# %%
def generate_pairs(apply, params, count, shape, key, batch=1000):
    noises, samples = [], []
    for start in range(0, count, batch):
        noise = jax.random.normal(jax.random.fold_in(key, start), (min(batch, count - start),) + shape)
        out, _ = samplers.sample_model(apply, params, schedule, velocity, noise=noise, sampler="dpmpp_2m",
                                       steps=25)
        noises.append(np.asarray(noise))
        samples.append(np.asarray(out))
    return np.concatenate(noises), np.concatenate(samples)


def reflow(model, params, noises, samples, steps, batch_size, learning_rate):
    config = TrainConfig(learning_rate=learning_rate, optimizer="adam", lr_decay="cosine", grad_clip=0.0,
                         ema_decay=0.0, total_steps=steps)
    loss = objectives.ReflowLoss(schedule, velocity, weighting, time_sampler)
    trainer = Trainer(model, train_config=config, loss=loss,
                      example_batch={"image": samples[:batch_size], "noise": noises[:batch_size]})
    start = jax.tree.map(jnp.copy, params)       # the train step donates its state; keep flow 1's params intact
    trainer.state = trainer.init().replace(params=start, ema_params=jax.tree.map(jnp.copy, start))
    history = fit(trainer, batches({"image": samples, "noise": noises}, batch_size, seed=1), steps)
    return trainer.state.params, history


noises_2d, samples_2d = generate_pairs(apply_2d, flow_1, pick(20000, 2000), (2,), jax.random.PRNGKey(2))
flow_2, history_2d = reflow(MLPDenoiser(), flow_1, noises_2d, samples_2d, pick(2000, 100), 512, 1e-3)
paths_2 = euler_paths(flow_2, noise_2d[:300], 50)

fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
for ax, paths, title in [(axes[0], paths_1, "1-rectified flow"), (axes[1], paths_2, "after reflow")]:
    ax.plot(paths[:, :, 0], paths[:, :, 1], lw=0.4, alpha=0.5)
    ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=3, c="k")
    ax.set_aspect("equal")
    ax.set_title(f"{title}: ODE paths noise -> data")
plt.show()

# %% [markdown]
# Straightness $S = \mathbb E \int_0^1 \| (\varepsilon - x_0) - v(x_t, t) \|^2 dt$ (0 for perfectly straight
# paths; computed along the 50-step paths) and sample quality at 1, 2, 5 and 10 Euler steps:

# %%
def straightness(paths):
    chord = paths[0] - paths[-1]
    steps = (paths[:-1] - paths[1:]) * (len(paths) - 1)
    return float(np.mean(np.sum((steps - chord[None]) ** 2, -1)))


print(f"straightness: flow 1 = {straightness(paths_1):.4f}, after reflow = {straightness(paths_2):.4f}")
step_list = [1, 2, 5, 10]
fig, axes = plt.subplots(2, 4, figsize=(9, 4.6))
for row, (params, name) in enumerate([(flow_1, "flow 1"), (flow_2, "reflow")]):
    for ax, steps in zip(axes[row], step_list):
        out = euler_paths(params, noise_2d, steps)[-1]
        scatter(ax, out, f"{name}, {steps} step{'s' * (steps > 1)}\nMMD {mmd(out[:1000], points[:1000]):.4f}")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Images: before and after reflow
#
# The same recipe on digits with a DiT (`models.get("dit-tiny")`, patch size 4 on 16x16 MNIST; 2 on 8x8 digits in
# fast mode). Generation uses flaxdiff's Euler sampler on a uniform grid in $t$ (`grid="flow_shift"`,
# shift 1), so `steps` is exactly the number of network evaluations.

# %%
size, dataset = pick((16, "mnist"), (8, "digits"))
images, _ = image_dataset(dataset, size)
model = models.get("dit-tiny", **pick({"patch_size": 4, "depth": 4}, FAST_DIT))
config = TrainConfig(learning_rate=pick(1e-3, 1e-3), warmup_steps=pick(200, 5), lr_decay="cosine", ema_decay=0.999,
                     total_steps=pick(1500, 30))
trainer = DiffusionTrainer(model, None, schedule, velocity, weighting, time_sampler, config, {"image": images[:64]})
loss_img = fit(trainer, batches({"image": images}, 64), config.total_steps)
apply_img, image_flow_1 = trainer.apply_fn(False), trainer.state.ema_params

noises_img, samples_img = generate_pairs(apply_img, image_flow_1, pick(4000, 256), (size, size, 1),
                                         jax.random.PRNGKey(3), batch=pick(1000, 256))
image_flow_2, history_img = reflow(model, image_flow_1, noises_img, samples_img, pick(1500, 20), 64, 3e-4)

plt.figure(figsize=(5, 2.4))
plt.plot(smooth(loss_img), label="flow 1 (fresh noise)")
reflow_curve = smooth(history_img)
plt.plot(np.arange(len(reflow_curve)) + len(loss_img), reflow_curve, label="reflow (paired noise)")
plt.yscale("log")
plt.xlabel("step")
plt.legend()
plt.show()

# %%
test_noise = jax.random.normal(jax.random.PRNGKey(4), (24, size, size, 1))
for params, name in [(image_flow_1, "flow 1"), (image_flow_2, "after reflow")]:
    panels = {}
    for steps in pick(step_list, [1, 2]):
        out, nfe = samplers.sample_model(apply_img, params, schedule, velocity, noise=test_noise, sampler="euler",
                                         steps=steps, grid="flow_shift", grid_options={"shift": 1.0})
        panels[f"{name}: {int(nfe)} NFE"] = np.asarray(out)
    show_grids(panels, columns=6, width=2.3)

# %% [markdown]
# Before reflow the 1- and 2-step images are the blurry average of many digits: the first Euler step follows
# the *average* direction $\mathbb E[\varepsilon - x_0 \mid x_1]$, i.e. it jumps to the mean of the data. After
# reflow each noise has one target, the paths are nearly straight, and a single step already draws a digit
# close to the one the 10-step ODE produces from the same noise (each column uses the same noise).
