# %% [markdown]
# # 1. Diffusion from scratch: forward process, DDPM, DDIM and the SDE/ODE view
#
# This notebook builds a diffusion model step by step with **flaxdiff**: first on 2D points, where every
# distribution can be drawn, then on real MNIST digits. Everything here — schedules, the training loss,
# the samplers — is the library; the notebook only defines a tiny MLP for the 2D data.
#
# **Fast mode.** Set `FLAXDIFF_TUTORIAL_FAST=1` to run with tiny step counts (the test suite does this);
# the committed outputs come from a full run.

# %%
import jax
import jax.numpy as jnp
import flax.linen as nn
import matplotlib.pyplot as plt
import numpy as np

from flaxdiff import denoiser, losses, models, predictors, samplers, schedules, timesteps
from flaxdiff.training import DiffusionTrainer, TrainConfig
from tutorial_utils import FAST_DIT, batches, fit, image_dataset, mmd, pick, ring_of_gaussians, scatter, setup_plots, \
    show_grid, show_grids, smooth

setup_plots()

# %% [markdown]
# ## The forward process
#
# A diffusion model destroys data $x_0$ by mixing it with Gaussian noise. In flaxdiff every diffusion is a pair of
# functions on $t \in [0, 1]$:
#
# $$x_t = \alpha(t)\, x_0 + \sigma(t)\, \varepsilon, \qquad \varepsilon \sim \mathcal N(0, I).$$
#
# DDPM (Ho et al. 2020) uses $T = 1000$ steps with variances $\beta_i$ rising linearly from $10^{-4}$ to $0.02$;
# with $\bar\alpha_i = \prod_{j \le i} (1 - \beta_j)$ one has $\alpha = \sqrt{\bar\alpha}$ and
# $\sigma = \sqrt{1 - \bar\alpha}$ ("variance preserving": $\alpha^2 + \sigma^2 = 1$). The single number that
# says how noisy $x_t$ is, is the log signal-to-noise ratio $\lambda(t) = \log(\alpha^2 / \sigma^2)$.
# Different schedules are just different speeds of walking down $\lambda$:

# %%
ts = jnp.linspace(0.0, 1.0, 201)
fig, axes = plt.subplots(1, 3, figsize=(9, 2.6))
for name in ["linear", "cosine", "cosine_continuous", "rectified_flow"]:
    schedule = schedules.get(name)
    alpha, sigma = schedule.alpha_sigma(ts)
    axes[0].plot(ts, alpha, label=name)
    axes[1].plot(ts, sigma, label=name)
    axes[2].plot(ts[1:-1], schedule.log_snr(ts[1:-1]), label=name)
for ax, title in zip(axes, [r"$\alpha(t)$", r"$\sigma(t)$", r"$\lambda(t) = \log \alpha^2/\sigma^2$"]):
    ax.set_title(title)
    ax.set_xlabel("t")
axes[2].set_ylim(-15, 12)
axes[0].legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# Our 2D data set is a ring of eight Gaussians. Watch it dissolve into $\mathcal N(0, I)$ under the DDPM schedule:

# %%
schedule = schedules.get("linear")
points, _ = ring_of_gaussians(jax.random.PRNGKey(0), 20000)
eps = np.asarray(jax.random.normal(jax.random.PRNGKey(1), points.shape))
fig, axes = plt.subplots(1, 5, figsize=(10, 2.2))
for ax, t in zip(axes, [0.0, 0.1, 0.25, 0.5, 1.0]):
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(jnp.float32(t)))
    scatter(ax, alpha * points[:2000] + sigma * eps[:2000], f"t = {t}: α={alpha:.2f}, σ={sigma:.2f}")
plt.show()

# %% [markdown]
# ## Learning to denoise
#
# The reverse process needs the *denoiser* $D(x_t, t) \approx \mathbb E[x_0 \mid x_t]$. DDPM trains a network
# $\varepsilon_\theta$ to predict the noise ("epsilon parameterisation"):
#
# $$\mathcal L = \mathbb E_{t, x_0, \varepsilon} \big\| \varepsilon_\theta(\alpha_t x_0 + \sigma_t \varepsilon, t) -
# \varepsilon \big\|^2, \qquad \hat x_0 = \frac{x_t - \sigma_t\, \varepsilon_\theta}{\alpha_t}.$$
#
# In flaxdiff that is `predictors.get("epsilon")` + `weightings.get("uniform")` + the discrete time sampler
# $t = i/T$; `losses.diffusion_loss` puts them together and `DiffusionTrainer` runs the jitted update. The network
# for 2D points is a small MLP with sinusoidal features of the noise-conditioning scalar `c_noise` $= 1000\,t$.
# Its call signature is the one every flaxdiff model has: `(x, c_noise, cond, train)`.

# %%
class MLPDenoiser(nn.Module):
    """F(x, c_noise) for 2D points: sinusoidal embedding of c_noise, three SiLU layers."""

    width: int = 128

    @nn.compact
    def __call__(self, x, c_noise, cond=None, train=False):
        freqs = jnp.exp(jnp.linspace(0.0, jnp.log(1000.0), 16))
        angles = c_noise[:, None] / 1000.0 * freqs[None] * 2.0
        h = jnp.concatenate([x, jnp.sin(angles), jnp.cos(angles)], axis=-1)
        for _ in range(3):
            h = nn.silu(nn.Dense(self.width)(h))
        return nn.Dense(x.shape[-1])(h)


epsilon = predictors.get("epsilon")
train_2d = TrainConfig(learning_rate=2e-3, warmup_steps=pick(100, 5), lr_decay="cosine", ema_decay=0.995,
                       total_steps=pick(4000, 150))
trainer_2d = DiffusionTrainer(MLPDenoiser(), {"name": "mlp"}, schedule, epsilon, losses.weightings.get("uniform"),
                              losses.time_samplers.get("discrete"), train_2d, {"image": points[:512]})
loss_2d = fit(trainer_2d, batches({"image": points}, 512), train_2d.total_steps)
mlp_apply = trainer_2d.apply_fn(False)          # apply(params, x, c_noise, cond): reuse it so jit caches hit
params_2d = trainer_2d.state.ema_params
plt.figure(figsize=(4, 2.2))
plt.plot(smooth(loss_2d))
plt.xlabel("step")
plt.ylabel("loss")
plt.yscale("log")
plt.show()

# %% [markdown]
# ## Sampling: DDPM and DDIM
#
# **DDPM** (ancestral sampling) walks back one level at a time, drawing from the Gaussian posterior
# $q(x_{s} \mid x_t, \hat x_0)$. **DDIM** (Song et al. 2021) keeps the same marginals but replaces the fresh noise
# by the predicted $\hat\varepsilon$, so the map noise $\to$ sample is deterministic and tolerates big steps.
# Both are one line in flaxdiff: `samplers.sample_model(..., sampler="ddpm" | "ddim", steps=N)`, with the grid
# of noise levels chosen separately (here `uniform` in $t$, as in the papers).

# %%
def sample_2d(sampler, steps, grid="uniform", count=2000, seed=0, **options):
    out, nfe = samplers.sample_model(mlp_apply, params_2d, schedule, epsilon, shape=(count, 2), sampler=sampler,
                                     steps=steps, grid=grid, key=jax.random.PRNGKey(seed), **options)
    return np.asarray(out), int(nfe)


fig, axes = plt.subplots(1, 4, figsize=(9, 2.4))
scatter(axes[0], points[:2000], "data", "k")
for ax, (sampler, steps) in zip(axes[1:], [("ddpm", pick(1000, 8)), ("ddpm", pick(20, 8)), ("ddim", pick(20, 8))]):
    out, nfe = sample_2d(sampler, steps)
    scatter(ax, out, f"{sampler}, {nfe} NFE\nMMD = {mmd(out[:1000], points[:1000]):.4f}")
plt.show()

# %% [markdown]
# ## The SDE / ODE view
#
# Let the number of steps go to infinity. Song et al. (2021) showed the forward process is an SDE and that there is
# a deterministic **probability-flow ODE** with the same marginals. In the variance-exploding coordinates
# $\tilde x = x_t / \alpha_t$ at noise level $s = \sigma_t / \alpha_t$ (Karras et al. 2022) it takes its simplest
# form:
#
# $$\frac{d\tilde x}{ds} = \frac{\tilde x - D(\tilde x, s)}{s},$$
#
# and the reverse SDE adds Langevin noise on top: $d\tilde x = -2 s\, \nabla \log p_s\, ds + \sqrt{2s}\,
# d\bar w$ with $\nabla \log p_s = (D - \tilde x)/s^2$. **DDIM is exactly Euler's method on this ODE and DDPM is an
# ancestral discretisation of the SDE.** flaxdiff samples *every* schedule in these coordinates, and
# `denoiser.ve_denoiser` turns our model into $D(\tilde x, s)$. Let us integrate the ODE by hand and draw the paths:

# %%
D = jax.jit(denoiser.ve_denoiser(denoiser.model_denoiser(mlp_apply, params_2d, schedule, epsilon), schedule))
grid = timesteps.get("karras", 40, schedule=schedule)          # s_0 > s_1 > ... > s_N = 0
x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (300, 2))) * grid[0]
path = [x / np.sqrt(1 + grid[0] ** 2)]                          # plot x_t = alpha x~ (alpha = 1 / sqrt(1 + s^2))
for s, s_next in zip(grid[:-1], grid[1:]):
    x = x + (s_next - s) * (x - np.asarray(D(jnp.asarray(x), jnp.full((300,), s, jnp.float32)))) / s
    path.append(x / np.sqrt(1 + s_next**2))
path = np.stack(path)
fig, axes = plt.subplots(1, 2, figsize=(7, 3.2))
axes[0].plot(path[:, :, 0], path[:, :, 1], lw=0.4, alpha=0.6)
axes[0].scatter(path[-1, :, 0], path[-1, :, 1], s=3, c="k")
axes[0].set_aspect("equal")
axes[0].set_title("probability-flow ODE paths (Euler = DDIM)")
axes[1].plot(np.linspace(0, 1, len(path)), path[:, :40, 0], lw=0.6)
axes[1].set_xlabel("step / N")
axes[1].set_title("first coordinate along the path")
plt.show()

# %% [markdown]
# Because the ODE is smooth, higher-order solvers (Heun, DPM-Solver++) reach the same distribution in far fewer
# network evaluations (NFE). The maximum mean discrepancy (MMD) to the data measures the quality of 2000 samples:

# %%
step_counts = pick([2, 4, 8, 16, 32, 64], [8])
fig, ax = plt.subplots(figsize=(5, 3))
for sampler, grid_name in [("ddpm", "uniform"), ("ddim", "uniform"), ("heun", "karras"), ("dpmpp_2m", "karras")]:
    nfes, scores = [], []
    for steps in step_counts:
        out, nfe = sample_2d(sampler, steps, grid_name)
        nfes.append(nfe)
        scores.append(mmd(out[:1000], points[:1000]))
    ax.plot(nfes, scores, "o-", label=f"{sampler} ({grid_name} grid)")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("NFE")
ax.set_ylabel("MMD to data")
ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# ## The same on MNIST
#
# Nothing changes for images but the network: a U-Net from the model registry (`models.get("unet-tiny")`, in fast
# mode a tiny DiT on 8x8 digits), trained on the 4500 real MNIST training digits bundled with flaxdiff, resized to
# 16x16 and scaled to $[-1, 1]$.

# %%
model_name, size, dataset = pick(("unet-tiny", 16, "mnist"), ("dit-tiny", 8, "digits"))
images, labels = image_dataset(dataset, size)
model = models.get(model_name, **pick({}, FAST_DIT))
train_img = TrainConfig(learning_rate=pick(2e-3, 1e-3), warmup_steps=pick(100, 5), lr_decay="cosine",
                        ema_decay=0.999, total_steps=pick(1500, 30))
trainer = DiffusionTrainer(model, None, schedule, epsilon, losses.weightings.get("uniform"),
                           losses.time_samplers.get("discrete"), train_img, {"image": images[:64]})
fit(trainer, batches({"image": images}, 64), train_img.total_steps)
apply_img, params_img = trainer.apply_fn(False), trainer.state.ema_params

x0 = images[:8]
noisy = [np.asarray(schedule.alpha(jnp.float32(t)) * x0 + schedule.sigma(jnp.float32(t)) *
                    jax.random.normal(jax.random.PRNGKey(0), x0.shape)) for t in [0, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0]]
show_grid(np.concatenate(noisy), columns=8, title="forward process at t = 0, .05, .1, .2, .4, .7, 1 (rows)")
plt.show()

# %%
panels = {}
for sampler, steps in pick([("ddpm", 250), ("ddim", 25), ("dpmpp_2m", 15)], [("ddim", 5), ("dpmpp_2m", 5)]):
    out, nfe = samplers.sample_model(apply_img, params_img, schedule, epsilon, shape=(36, size, size, 1),
                                     sampler=sampler, steps=steps, grid="uniform", key=jax.random.PRNGKey(7))
    panels[f"{sampler}, {int(nfe)} NFE"] = np.asarray(out)
show_grids(panels, columns=6, width=3.0)

# %% [markdown]
# DDPM needs hundreds of steps; DDIM (the Euler ODE step) gets a similar picture in 25, and the second-order
# DPM-Solver++(2M) in 15. The next notebooks change the *parameterisation* (EDM), the *path* (rectified flow) and
# the *conditioning* (guidance) — each is a different argument to the same three calls used here.
