# %% [markdown]
# # 5. Latent diffusion: a small VAE, diffusion in its latent space, decoding
#
# Latent diffusion (Rombach et al. 2022) splits generation in two: an autoencoder compresses images into a
# smaller latent $z$ once, and the diffusion model works on $z$, which is cheaper and spends no capacity on
# imperceptible pixel detail. This notebook trains flaxdiff's KL autoencoder (`models.get("autoencoder-tiny")`,
# the Stable Diffusion VAE layout at toy width, downsampling by 4), diffuses in its latent space and decodes.
#
# **Fast mode:** `FLAXDIFF_TUTORIAL_FAST=1` (tiny step counts, a VAE of two levels; committed outputs are from
# a full run).

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from flaxdiff import losses, models, objectives, predictors, samplers, schedules
from flaxdiff.models import AutoencoderKL, scale_latents, unscale_latents
from flaxdiff.training import DiffusionTrainer, TrainConfig, Trainer
from tutorial_utils import FAST_DIT, batches, fit, image_dataset, pick, setup_plots, show_grid, show_grids

setup_plots()

# %% [markdown]
# ## The VAE
#
# The encoder outputs a Gaussian posterior $q(z \mid x) = \mathcal N(\mu(x), \operatorname{diag} e^{\log v(x)})$,
# the decoder maps $z$ back. Training maximises a (weighted) evidence lower bound:
#
# $$\mathcal L_\text{VAE} = \mathbb E_{z \sim q(z \mid x)} \|x - \text{Dec}(z)\|^2 + \beta\, \mathrm{KL}(q(z \mid x)
# \,\|\, \mathcal N(0, I)),\qquad \mathrm{KL} = \tfrac12 \sum (\mu^2 + v - 1 - \log v).$$
#
# A small $\beta$ keeps reconstructions sharp while keeping the latent space smooth and bounded — which is what the
# diffusion model needs. `AutoencoderKL.__call__` samples $z$ with the reparameterisation trick (rng `"sample"`).

# %%
size, dataset = pick((16, "mnist"), (8, "digits"))
images, labels = image_dataset(dataset, size)
vae = models.get("autoencoder-tiny", **pick({}, {"block_out_channels": (16, 32)}))   # fast: downsampling by 2
beta = 1e-3
vae_steps = pick(1200, 20)
# objectives.AutoencoderLoss is this loss divided by the D = H W C pixels (||x - Dec(z)||^2 / D + beta KL / D, the
# same optimum); the one trainer that trains the diffusion models below trains the VAE too (Adam, no EMA).
vae_config = TrainConfig(learning_rate=2e-3, optimizer="adam", warmup_steps=min(100, vae_steps // 2),
                         lr_decay="cosine", grad_clip=0.0, ema_decay=0.0, total_steps=vae_steps)
vae_trainer = Trainer(vae, train_config=vae_config, example_batch={"image": images[:32]},
                      loss=objectives.AutoencoderLoss(kl_weight=beta))
vae_trainer.init()
data_iter = batches({"image": images}, 32)
parts = jax.device_get([vae_trainer.train_step(next(data_iter)) for _ in range(vae_steps)])
pixels = np.prod(images.shape[1:])
history = np.asarray([[p["mse"] * pixels, p["kl"] * pixels] for p in parts])   # per image: sum of squares, nats
vae_params = vae_trainer.state.params
print(f"VAE: {vae_steps} steps; reconstruction error {history[:10, 0].mean():.2f} -> {history[-10:, 0].mean():.2f},"
      f" KL {history[-10:, 1].mean():.1f} nats per image")

# %%
mean, logvar = vae.apply({"params": vae_params}, images[:8], method=AutoencoderKL.encode)
recon = vae.apply({"params": vae_params}, mean, method=AutoencoderKL.decode)
print(f"image {images.shape[1:]} -> latent {mean.shape[1:]} ({np.prod(images.shape[1:]) / np.prod(mean.shape[1:]):g}x"
      f" fewer numbers)")
fig, axes = plt.subplots(1, 3, figsize=(9, 2.2))
show_grid(images[:8], 8, "images", axes[0])
show_grid(np.asarray(recon), 8, "reconstructions (decoded posterior mean)", axes[1])
latent_view = np.asarray(mean[:8]).transpose(0, 3, 1, 2).reshape(8 * mean.shape[-1], mean.shape[1], mean.shape[2], 1)
show_grid(latent_view / np.abs(latent_view).max(), mean.shape[-1], "latent channels (rows = images)", axes[2])
plt.show()

# %% [markdown]
# ## Scaling the latents
#
# Diffusion schedules assume data of roughly unit scale (EDM's $\sigma_\text{data}$). Stable Diffusion multiplies
# latents by a `scaling_factor` $= 1/\operatorname{std}(z)$ estimated on data; flaxdiff does the same
# (`estimate_latent_scale`, then `scale_latents` / `unscale_latents`).

# %%
scale = vae.estimate_latent_scale(vae_params, images[:1000])            # 1 / std of the posterior means
vae_config = vae.config.replace(scaling_factor=scale)
encode = jax.jit(lambda x: vae.apply({"params": vae_params}, x, method=AutoencoderKL.encode))
latents = np.concatenate([np.asarray(scale_latents(vae_config, encode(images[i:i + 500])[0]))
                          for i in range(0, len(images), 500)])
print(f"scaling_factor = {scale:.3f}; scaled latents: mean {latents.mean():.3f}, std {latents.std():.3f}")

# %% [markdown]
# ## Diffusion in latent space
#
# The diffusion model is a DiT on the latent "image" (patch size 1, 4 channels), trained with the EDM recipe
# ($\sigma_\text{data} = 1$ for unit-variance latents). Sampling returns latents, which the decoder turns into
# digits: $x = \text{Dec}(z / \text{scaling\_factor})$.

# %%
schedule = schedules.get("karras")
edm = predictors.get("edm", sigma_data=1.0)
latent_model = models.get("dit-tiny", **{**pick({"depth": 4}, FAST_DIT), "in_channels": vae_config.latent_channels,
                                           "patch_size": 1})
config = TrainConfig(learning_rate=1e-3, warmup_steps=pick(100, 5), lr_decay="cosine", ema_decay=0.999,
                     total_steps=pick(1500, 30))
trainer = DiffusionTrainer(latent_model, None, schedule, edm, losses.weightings.get("edm", sigma_data=1.0),
                           losses.time_samplers.get("edm_lognormal"), config, {"image": latents[:64]})
fit(trainer, batches({"image": latents}, 64), config.total_steps)

z, nfe = samplers.sample_model(trainer.apply_fn(False), trainer.state.ema_params, schedule, edm,
                               shape=(36,) + latents.shape[1:], sampler="heun", steps=pick(18, 5), grid="karras",
                               key=jax.random.PRNGKey(3))
decode = jax.jit(lambda z: vae.apply({"params": vae_params}, z, method=AutoencoderKL.decode))
samples = np.asarray(decode(unscale_latents(vae_config, z)))
random_latents = np.asarray(decode(unscale_latents(vae_config, jax.random.normal(jax.random.PRNGKey(4), z.shape))))
show_grids({f"latent diffusion: Heun {int(nfe)} NFE, decoded": samples,
            "decoded N(0, I) latents (no diffusion)": random_latents,
            "real digits": images[100:136]}, columns=6, width=3.0)

# %% [markdown]
# Decoding plain Gaussian latents gives smudges: the VAE's latent space is only *roughly* Gaussian (that is what the
# small $\beta$ buys). The diffusion model learns the real latent distribution, and its samples decode into digits.
# For real images the same code runs with a pretrained Stable Diffusion VAE loaded by `flaxdiff.interop`.
