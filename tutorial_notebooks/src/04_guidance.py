# %% [markdown]
# # 4. Classifier-free guidance and text conditioning
#
# A conditional model learns $D(x, s, c) \approx \mathbb E[x_0 \mid x, c]$. **Classifier-free guidance** (Ho &
# Salimans 2022) trains the *same* network to also be unconditional, by replacing the condition with a learned
# null $\varnothing$ with probability $p$ (condition dropout), and at sampling time extrapolates:
#
# $$\hat x_0 = D(x, s, \varnothing) + w\,\big(D(x, s, c) - D(x, s, \varnothing)\big).$$
#
# $w = 1$ is the plain conditional model, $w = 0$ unconditional, $w > 1$ samples from the sharpened
# $p_w(x \mid c) \propto p(x)\, p(c \mid x)^w$: more typical of the class, less diverse. The **guidance interval**
# (Kynkäänniemi et al. 2024) applies $w$ only for noise levels $s \in [s_\text{lo}, s_\text{hi}]$: at high noise
# guidance mostly kills diversity, at low noise it does little.
#
# In flaxdiff: `TrainConfig(cond_drop_prob=p, null_cond={"label": num_classes})` for training, and
# `samplers.sample_model(..., guidance_scale=w, null_cond=..., guidance_interval=(lo, hi))` for sampling; the
# conditional and unconditional rows go through one batched forward pass.
#
# **Fast mode:** `FLAXDIFF_TUTORIAL_FAST=1` (tiny step counts; committed outputs are from a full run).

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from flaxdiff import guidance, losses, metrics, models, predictors, samplers, schedules
from flaxdiff.models import text
from flaxdiff.training import DiffusionTrainer, TrainConfig
from tutorial_utils import FAST, FAST_DIT, MLPDenoiser, batches, fit, image_dataset, pick, ring_of_gaussians, scatter, \
    setup_plots, show_grid, show_grids

setup_plots()
schedule = schedules.get("karras")
edm = predictors.get("edm", sigma_data=0.5)
weighting = losses.weightings.get("edm", sigma_data=0.5)
time_sampler = losses.time_samplers.get("edm_lognormal")

# %% [markdown]
# ## Guidance on 2D data
#
# Eight overlapping clusters, the class is the cluster index. Watch class 0 (red) and class 1 (blue) as $w$ grows:
# at $w = 0$ both colours cover the whole ring; $w = 1$ is the true class-conditional; $w > 1$ pushes samples away
# from the other classes, even beyond the data.

# %%
points, modes = ring_of_gaussians(jax.random.PRNGKey(0), 20000, std=0.35)
config_2d = TrainConfig(learning_rate=2e-3, warmup_steps=pick(100, 5), lr_decay="cosine", ema_decay=0.995,
                        total_steps=pick(3000, 150), cond_drop_prob=0.2, null_cond={"label": 8})
trainer_2d = DiffusionTrainer(MLPDenoiser(num_classes=8), {"name": "mlp"}, schedule, edm, weighting, time_sampler,
                              config_2d, {"image": points[:512], "label": modes[:512].astype(np.int32)})
fit(trainer_2d, batches({"image": points, "label": modes.astype(np.int32)}, 512), config_2d.total_steps)
apply_2d, params_2d = trainer_2d.apply_fn(False), trainer_2d.state.ema_params

fig, axes = plt.subplots(1, 5, figsize=(10, 2.3))
for ax, scale in zip(axes, [0.0, 1.0, 2.0, 4.0, 8.0]):
    for label, color in [(0, "C3"), (1, "C0")]:
        out, _ = samplers.sample_model(apply_2d, params_2d, schedule, edm, shape=(500, 2),
                                       cond={"label": jnp.full((500,), label, jnp.int32)}, guidance_scale=scale,
                                       null_cond={"label": 8}, steps=20, key=jax.random.PRNGKey(label))
        scatter(ax, np.asarray(out), f"w = {scale:g}", color, lim=4.0)
plt.show()

# %% [markdown]
# ## Class-conditional MNIST and a guidance-scale sweep
#
# The model is a small DiT (`models.get("dit-tiny", num_classes=10)`, patch size 4 on 16x16 MNIST); label 10 is
# its learned null class.

# %%
size, dataset = pick((16, "mnist"), (8, "digits"))
images, labels = image_dataset(dataset, size)
model = models.get("dit-tiny", num_classes=10, **pick({"patch_size": 4, "depth": 4}, FAST_DIT))
config = TrainConfig(learning_rate=pick(2e-3, 1e-3), warmup_steps=pick(100, 5), lr_decay="cosine", ema_decay=0.999,
                     total_steps=pick(1500, 30), cond_drop_prob=0.15, null_cond={"label": 10})
trainer = DiffusionTrainer(model, None, schedule, edm, weighting, time_sampler, config,
                           {"image": images[:64], "label": labels[:64]})
fit(trainer, batches({"image": images, "label": labels}, 64), config.total_steps)
apply, params = trainer.apply_fn(False), trainer.state.ema_params

# %% [markdown]
# We score samples by **class accuracy** (does a digit classifier agree with the requested class? flaxdiff's cached
# MNIST CNN, `metrics.get_mnist_classifier`; in fast mode a nearest-class-mean classifier stands in) and by
# **diversity**, the mean pixel distance between two samples of the same class.

# %%
if FAST:
    centroids = np.stack([images[labels == k].mean(0) for k in range(10)])

    def predict(x):
        return np.argmin(((x[:, None] - centroids[None]) ** 2).reshape(len(x), 10, -1).sum(-1), axis=1)
else:
    classifier = metrics.get_mnist_classifier(image_size=size)
    predict = classifier.predict
    print(f"classifier accuracy on held-out real digits: {classifier.test_accuracy:.3f}")

per_class = pick(20, 4)
sweep_labels = jnp.repeat(jnp.arange(10, dtype=jnp.int32), per_class)


def generate(scale, interval=None, cond_labels=sweep_labels, seed=0):
    out, _ = samplers.sample_model(apply, params, schedule, edm, shape=(len(cond_labels), size, size, 1),
                                   cond={"label": cond_labels}, guidance_scale=scale, null_cond={"label": 10},
                                   guidance_interval=interval, sampler="heun", steps=pick(18, 5), grid="karras",
                                   key=jax.random.PRNGKey(seed))
    return np.asarray(jnp.clip(out, -1, 1))


def score(samples):
    accuracy = float(np.mean(predict(samples) == np.asarray(sweep_labels)))
    grouped = samples.reshape(10, per_class, -1)
    diversity = float(np.mean(np.sqrt(((grouped[:, :, None] - grouped[:, None]) ** 2).mean(-1))))
    return accuracy, diversity * per_class / (per_class - 1)


scales = pick([0.0, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0], [1.0, 4.0])
results = {scale: generate(scale) for scale in scales}
scores = np.array([score(results[scale]) for scale in scales])
fig, ax = plt.subplots(figsize=(4.5, 2.8))
ax.plot(scales, scores[:, 0], "o-", color="C0")
ax.set_xlabel("guidance scale w")
ax.set_ylabel("class accuracy", color="C0")
ax2 = ax.twinx()
ax2.plot(scales, scores[:, 1], "s--", color="C1")
ax2.set_ylabel("diversity", color="C1")
plt.show()

# %%
shown = pick([0.0, 1.0, 3.0, 8.0], [1.0, 4.0])
show_grids({f"w = {scale:g}": results[scale].reshape(10, per_class, size, size, 1)[:, :6].reshape(-1, size, size, 1)
            for scale in shown}, columns=6, width=2.3)

# %% [markdown]
# ## The guidance interval
#
# Same $w$, applied only for $s \in [0.3, 5]$ (fast mode: the same code with fewer samples). Outside the interval the
# plain conditional model runs, so high-noise steps keep their diversity.

# %%
strong = pick(5.0, 4.0)
interval = (0.3, 5.0)
with_interval = generate(strong, interval)
print(f"w = {strong:g} everywhere:      accuracy {score(results[strong])[0]:.3f}, "
      f"diversity {score(results[strong])[1]:.3f}")
print(f"w = {strong:g} in s in {interval}: accuracy {score(with_interval)[0]:.3f}, "
      f"diversity {score(with_interval)[1]:.3f}")
pick_six = lambda x: x.reshape(10, per_class, size, size, 1)[:, :6].reshape(-1, size, size, 1)  # noqa: E731
show_grids({f"w = {strong:g} at every level": pick_six(results[strong]),
            f"w = {strong:g} for s in {interval}": pick_six(with_interval)}, columns=6, width=2.6)

# %% [markdown]
# ## Text conditioning
#
# Conditioning on text is the same machinery with a different `cond`: token embeddings for cross-attention
# (`cond["text"]`, `cond["text_mask"]`) plus a pooled vector (`cond["pooled"]`). flaxdiff's small byte-level
# `TextEncoder` (`models.get("text_encoder-tiny")`) stands in for CLIP/T5; as with a pretrained encoder it is
# frozen — here simply at its random initialisation, which still maps different captions to different embeddings.
# Every training digit gets a caption from a few templates; the null condition for dropout is all-zero embeddings
# (`TrainConfig(cond_drop_prob=..., null_cond={})` zeros every float entry and keeps the mask).

# %%
encoder = models.get("text_encoder-tiny")
encoder_params = encoder.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
templates = ["a handwritten {}", "the digit {}", "number {}", "{} written by hand"]
captions = [template.format(name) for name in names for template in templates]
caption_cond = text.encode_text(encoder, encoder_params, captions)           # dict of (40, ...) arrays
caption_index = labels * len(templates) + np.random.default_rng(0).integers(0, len(templates), len(labels))
text_arrays = {"image": images, **{key: np.asarray(value)[caption_index] for key, value in caption_cond.items()}}
print("example captions:", [captions[i] for i in caption_index[:4]])

width = encoder.config.width
text_model = models.get("dit-tiny", text_dim=width, pooled_dim=width, **pick({"patch_size": 4, "depth": 4}, FAST_DIT))
text_config = TrainConfig(learning_rate=1e-3, warmup_steps=pick(100, 5), lr_decay="cosine", ema_decay=0.999,
                          total_steps=pick(1500, 30), cond_drop_prob=0.15, null_cond={})
text_trainer = DiffusionTrainer(text_model, None, schedule, edm, weighting, time_sampler, text_config,
                                {key: value[:64] for key, value in text_arrays.items()})
fit(text_trainer, batches(text_arrays, 64), text_config.total_steps)
text_apply, text_params = text_trainer.apply_fn(False), text_trainer.state.ema_params

# %%
prompts = ["a handwritten three", "the digit seven", "number zero", "five written by hand"]
per_prompt = 8
cond = text.encode_text(encoder, encoder_params, [p for p in prompts for _ in range(per_prompt)])
null = {"text": jnp.zeros_like(cond["text"]), "text_mask": cond["text_mask"], "pooled": jnp.zeros_like(cond["pooled"])}
panels = {}
for scale in pick([1.0, 3.0], [3.0]):
    out, _ = samplers.sample_model(text_apply, text_params, schedule, edm, shape=(len(prompts) * per_prompt, size,
                                   size, 1), cond=cond, guidance_scale=scale, null_cond=null, sampler="heun",
                                   steps=pick(18, 5), key=jax.random.PRNGKey(1))
    panels[f"w = {scale:g}"] = np.asarray(out)
show_grids(panels, columns=per_prompt, width=3.2)
print("rows:", prompts)
