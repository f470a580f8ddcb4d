# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Appendix: the reference's released checkpoints
#
# The paper's numbers come from models trained for weeks on many GPUs: no
# chapter of this book can retrain them. The authors released the weights
# instead, as files of `openai/guided-diffusion`: ImageNet diffusion models at
# $64$, $128$, $256$ and $512$ pixels, the noisy-image classifiers that guide
# them, two upsamplers ($64 \to 256$ and $128 \to 512$) and models of three
# LSUN classes. Because adm_lib's modules mirror the reference's module tree
# (chapter 3), those files load into adm_lib's models unchanged, and the
# samplers of chapter 2 run them.
#
# Three things decide whether a released file is useful:
#
# 1. **The flags.** A checkpoint is only a dictionary of tensors. The
#    architecture that gives them meaning is described by the command-line
#    flags the reference's README gives next to each file; a model built with
#    other flags either refuses to load or, worse, loads and computes
#    something else.
# 2. **The file, on disk.** Nothing in this book downloads anything: fetch
#    the files yourself (links in the reference's README) and point the
#    chapter at them.
# 3. **The pipeline.** Sampling needs a diffusion built from the *same*
#    flags, guidance needs the classifier of the same resolution, and an
#    upsampler needs low-resolution images and their labels.
#
# With no file given, the chapter still runs end to end in seconds: each
# model is then a tiny, randomly initialised **stand-in** built from shrunk
# flags, saved to a temporary file and loaded back exactly as a real
# checkpoint would be. Its images are noise, but every line of code that a real
# checkpoint goes through runs, and the test suite runs it.

# %% tags=["parameters"]
# Smoke configuration: no checkpoint files, so every model is a tiny random
# stand-in and the chapter runs on a CPU in seconds. With the released files
# in models/ under the project root (section A.1):
#   adm book run appendix_checkpoints -p model_path models/64x64_diffusion.pt
#     -p classifier_path models/64x64_classifier.pt
#     -p upsampler_path models/64_256_upsampler.pt -p device cuda
model_path: str = ""  # a diffusion model's .pt; "" for a tiny stand-in
model_flags: str = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
    "--dropout 0.1 --image_size 64 --learn_sigma True --noise_schedule cosine "
    "--num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
    "--resblock_updown True --use_new_attention_order True --use_fp16 True "
    "--use_scale_shift_norm True"
)  # its flags: the 64x64 model's, from the reference's README
classifier_path: str = ""  # its classifier's .pt; "" for a stand-in
classifier_flags: str = (
    "--image_size 64 --classifier_depth 4")  # the 64x64 classifier's
classifier_scale: float = 1.0  # guidance scale (README: 1.0 at 64); 0: none
upsampler_path: str = ""  # an upsampler's .pt; "" for a stand-in
upsampler_flags: str = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
    "--large_size 256  --small_size 64 --learn_sigma True "
    "--noise_schedule linear --num_channels 192 --num_heads 4 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True "
    "--use_scale_shift_norm True"
)  # its flags: the 64 -> 256 upsampler's
respacing: str = "25"  # sampling steps: "250", "25", or "ddim25" for DDIM
num_samples: int = 4  # images sampled, classified and upsampled
device: str = "auto"  # "cuda", "cpu", or "auto" for cuda where available
save_samples: str = ""  # an .npz to write the samples to, as the reference
seed: int = 0  # of the stand-ins' weights and of sampling

# %%
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from adm_lib.book import find_root
from adm_lib.cascade import Stage, upsample
from adm_lib.compat.guided_diffusion import (
    BUILDERS,
    NUM_CLASSES,
    RELEASED,
    config_from_flags,
    diffusion_from_flags,
    load_checkpoint,
    parse_flags,
)
from adm_lib.devices import resolve_device
from adm_lib.diffusion import ddim_sample_loop, p_sample_loop
from adm_lib.guidance import classifier_cond_fn, ignore_labels
from adm_lib.models import TrainedModel
from adm_lib.viz import show_images
from adm_lib.viz import to_uint8 as uint8_nhwc

# Relative paths, the parameters' too, start at the book's root, as under
# `adm book run`, wherever the kernel starts (JupyterLab: in chapters/).
os.chdir(find_root())
device = str(resolve_device(device))
torch.manual_seed(seed)
print(f"device: {device}")

# %% [markdown]
# ## A.1 The released files and their flags
#
# The reference's README lists fifteen files. Put each where the reference's
# own commands expect it, `models/<file>`, under the project root (where a
# chapter's relative paths start), and pass its path and flags as
# parameters: `-p model_path models/128x128_diffusion.pt -p model_flags
# "..."`. A classifier goes with the diffusion model of its resolution; the
# classifier scale is the one the README samples with.
#
# | file | kind | use with | guidance scale |
# | --- | --- | --- | --- |
# | `64x64_diffusion.pt` | diffusion | 64x64_classifier.pt | 1.0 |
# | `64x64_classifier.pt` | classifier | 64x64_diffusion.pt | |
# | `128x128_diffusion.pt` | diffusion | 128x128_classifier.pt | 0.5 |
# | `128x128_classifier.pt` | classifier | 128x128_diffusion.pt | |
# | `256x256_diffusion.pt` | diffusion | 256x256_classifier.pt | 1.0 |
# | `256x256_diffusion_uncond.pt` | diffusion | 256x256_classifier.pt | 10.0 |
# | `256x256_classifier.pt` | classifier | a 256 diffusion model | |
# | `512x512_diffusion.pt` | diffusion | 512x512_classifier.pt | 4.0 |
# | `512x512_classifier.pt` | classifier | 512x512_diffusion.pt | |
# | `64_256_upsampler.pt` | upsampler | 64 samples | |
# | `128_512_upsampler.pt` | upsampler | 128 samples | |
# | `lsun_bedroom.pt` | diffusion | (unconditional) | |
# | `lsun_cat.pt` | diffusion | (unconditional) | |
# | `lsun_horse.pt` | diffusion | (unconditional) | |
# | `lsun_horse_nodropout.pt` | diffusion | (unconditional) | |
#
# The flags, exactly as the README gives them, are too long for a table: they
# are the values of `adm_lib.compat.guided_diffusion.RELEASED`, printed
# below, one entry per file, ready to paste after `-p model_flags` (or
# `classifier_flags`, `upsampler_flags`). A classifier's
# flags are the sampling script's defaults at the model's `--image_size`,
# except that the 64 classifier is 4 blocks deep. Dropout acts only in
# training and changes no weight's shape, so `--dropout` changes nothing
# here: `lsun_horse_nodropout.pt` is a horse model trained without dropout,
# and its `--dropout 0.0` only records that.

# %%
for name, (kind, flags) in RELEASED.items():
    parse_flags(flags)  # every flag is one the reference knows
    print(f"models/{name}.pt ({kind}):\n    {flags}")
assert len(RELEASED) == 15
assert parse_flags(RELEASED["lsun_horse_nodropout"][1])["dropout"] == 0.0

# %% [markdown]
# What the flags become: each of the 64x64 model's flags, read by
# `parse_flags`, sets an argument of the UNet (`unet_arguments`), of the
# diffusion (`diffusion_from_flags`), or no weight at all. Drawn from the
# parsed values, so the picture is the code's mapping:

# %% jupyter={"source_hidden": true}
from matplotlib.patches import FancyArrowPatch

from adm_lib.compat.guided_diffusion import unet_arguments

released = RELEASED["64x64_diffusion"][1]
parsed, unet = parse_flags(released), unet_arguments(released)
process = diffusion_from_flags(released)
MAPPING = {  # flag: (where it goes, what it sets there)
    "attention_resolutions": (
        "UNet", f"attention at down-factors {unet['attention_resolutions']}"),
    "class_cond": ("UNet", f"num_classes = {unet['num_classes']}"),
    "diffusion_steps": ("diffusion", f"T = {process.num_timesteps}"),
    "dropout": ("UNet", f"dropout = {unet['dropout']} (training only)"),
    "image_size": ("UNet", f"channel_mult = {unet['channel_mult']}"),
    "learn_sigma": ("UNet", f"out_channels = {unet['out_channels']}: "
                    "mean and variance"),
    "noise_schedule": ("diffusion", f"{parsed['noise_schedule']} betas"),
    "num_channels": ("UNet", f"model_channels = {unet['model_channels']}"),
    "num_head_channels": ("UNet", "num_head_channels = "
                          f"{unet['num_head_channels']}"),
    "num_res_blocks": ("UNet", f"num_res_blocks = {unet['num_res_blocks']}"),
    "resblock_updown": ("UNet", "BigGAN resampling"),
    "use_fp16": ("no weight", "the reference ran in fp16"),
    "use_new_attention_order": ("UNet", "q, k, v split order"),
    "use_scale_shift_norm": ("UNet", "AdaGN"),
}
COLOURS = {"UNet": "#c6dbef", "diffusion": "#fdd0a2", "no weight": "#e0e0e0"}
given = re.findall(r"--(\w+)", released)
fig, ax = plt.subplots(figsize=(10, 0.36 * len(given) + 0.8))
for row, name in enumerate(given):
    y = len(given) - row
    where, what = MAPPING[name]
    ax.text(0.0, y, f"--{name} {parsed[name]}", va="center",
            family="monospace", fontsize=8)
    ax.text(5.6, y, f"{where}: {what}", va="center", fontsize=8,
            bbox={"facecolor": COLOURS[where], "edgecolor": "none"})
    ax.add_patch(FancyArrowPatch((4.2, y), (5.5, y), arrowstyle="-|>",
                                 mutation_scale=10, color="grey"))
ax.set(xlim=(0, 11), ylim=(0.3, len(given) + 0.8),
       title="The 64x64 model's README flags, and what each one sets")
ax.axis("off")
plt.show()
assert sorted(given) == sorted(MAPPING)  # every flag given is drawn
assert unet["out_channels"] == 2 * unet["in_channels"]  # learn_sigma

# %% [markdown]
# Which released files do this run's flags describe? Flags are compared after
# parsing, so their order and spelling (`True`, `true`, `1`) do not matter.

# %%
for role, given in [("model", model_flags),
                    ("classifier", classifier_flags),
                    ("upsampler", upsampler_flags)]:
    same = [f"{name}.pt" for name, (_, flags) in RELEASED.items()
            if parse_flags(flags) == parse_flags(given)]
    print(f"{role}_flags: {', '.join(same) or 'no released file'}")

# %% [markdown]
# ## A.2 How big they are
#
# Chapter 3 (section 3.9) counts these models on PyTorch's `meta` device and
# checks the counts against the reference's. Here the same count says what to
# expect before downloading: float32 weights take four bytes per parameter,
# and sampling runs the diffusion model once per step and image.

# %%
counts = {}
print(f"{'file':<28}{'parameters':>14}{'entries':>9}{'float32':>11}")
for name, (kind, flags) in RELEASED.items():
    with torch.device("meta"):
        built = BUILDERS[kind](flags)
    params = sum(p.numel() for p in built.parameters())
    counts[name] = (params, len(built.state_dict()))
    print(f"{name + '.pt':<28}{params:>14,}{counts[name][1]:>9}"
          f"{params * 4 / 2**30:>7.2f} GiB")
assert all(p.device.type == "meta" for p in built.parameters())
assert counts["lsun_horse"] == counts["lsun_horse_nodropout"]

# %% [markdown]
# ## A.3 Loading a checkpoint, or a stand-in
#
# `load_checkpoint(path, flags, kind)` builds the model of a kind
# (`"diffusion"`, `"classifier"` or `"upsampler"`) from flags, reads the
# file with `torch.load(..., weights_only=True)` (so that a file cannot run
# code as it loads) and loads it strictly, in evaluation mode.
#
# Without a path we make a file to load. The stand-in keeps every flag that
# decides *what* the model is (class-conditional or not, learned variance,
# noise schedule, resampling, normalisation) and shrinks only *how big* it
# is: later flags override earlier ones, so appending `--num_channels 32`
# narrows the model. The stand-ins also work at small sizes whatever the
# flags say, $32$ pixels for the diffusion model, $64$ for the classifier
# (the smallest size the reference builds one for) and $32 \to 64$ for the
# upsampler, so that a CPU samples them in seconds. ADM zero-initialises its
# output layers, so a fresh model would predict exactly zero; the stand-in's
# weights are perturbed a little so that it computes something, as a trained
# model would.

# %%
SHRINK = {
    "diffusion": ("--image_size 32 --num_channels 32 --num_res_blocks 1 "
                  "--channel_mult 1,2 --attention_resolutions 8"),
    "classifier": ("--image_size 64 --classifier_width 32 "
                   "--classifier_depth 1 "
                   "--classifier_attention_resolutions 8"),
    "upsampler": ("--num_channels 32 --num_res_blocks 1 --large_size 64 "
                  "--small_size 32 --attention_resolutions 8"),
}
scratch = Path(tempfile.mkdtemp(prefix="adm_stand_in_"))


def save_stand_in(kind, flags):
    """Save a tiny random model of `kind` shrunk from `flags`; its path."""
    tiny = f"{flags} {SHRINK[kind]}"
    module = BUILDERS[kind](tiny)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.02 * torch.randn_like(param))
    scratch.mkdir(exist_ok=True)  # removed at the end of the chapter
    path = scratch / f"stand_in_{kind}.pt"
    torch.save(module.state_dict(), path)
    return path, tiny


def load(kind, path, flags):
    """A released checkpoint, or a stand-in where no path is given."""
    if not path:
        path, flags = save_stand_in(kind, flags)
        print(f"{kind}: no checkpoint given: a randomly initialised "
              "stand-in, so the images are noise")
    start = time.perf_counter()
    module = load_checkpoint(path, flags, kind=kind).to(device)
    params = sum(p.numel() for p in module.parameters())
    print(f"{kind}: {type(module).__name__} from {Path(path).name}, "
          f"{params:,} parameters, {time.perf_counter() - start:.1f} s")
    return module, flags


# From here on, the flags are those the models were built with.
model, model_flags = load("diffusion", model_path, model_flags)
classifier, classifier_flags = load(
    "classifier", classifier_path, classifier_flags)
upsampler, upsampler_flags = load("upsampler", upsampler_path,
                                  upsampler_flags)
for module in (model, classifier, upsampler):
    assert not module.training  # evaluation mode: no dropout
    assert all(torch.isfinite(p).all() for p in module.parameters())

# %% [markdown]
# ## A.4 When the flags are wrong
#
# The error users meet first is a checkpoint loaded with flags that do not
# match it. A strict load would list hundreds of keys; adm_lib instead names
# the flag that is most likely wrong. Here a model's state dict, saved to a
# file, is loaded with one flag flipped: `--class_cond`.

# %%
demo_path, demo_flags = save_stand_in("diffusion", model_flags)
class_cond = parse_flags(demo_flags)["class_cond"]
wrong = f"{demo_flags} --class_cond {not class_cond}"
try:
    load_checkpoint(demo_path, wrong, kind="diffusion")
    raise AssertionError("a mismatched checkpoint loaded")
except ValueError as err:
    print(err)
    message = str(err)
assert "--class_cond" in message and demo_path.name in message

# %% [markdown]
# A missing file is the other common error; the message says where the file
# was expected and where to get it.

# %%
try:
    load_checkpoint(scratch / "models/64x64_diffusion.pt", model_flags)
    raise AssertionError("a missing checkpoint loaded")
except FileNotFoundError as err:
    print(err)
    assert "guided-diffusion" in str(err)

# %% [markdown]
# Not every wrong flag can be caught. The number of attention heads
# (`--num_heads`, `--num_head_channels`) and `--use_new_attention_order`
# change how the weights are used but no weight's shape, so a model built with
# the wrong ones loads silently and produces poor images. Copy the flags from
# `RELEASED`, never by hand.
#
# ## A.5 Sampling
#
# The diffusion comes from the same flags as the model (schedule, learned
# variance, number of steps), respaced to fewer steps with
# `--timestep_respacing`. The README samples with 250 steps; a `ddim`
# prefix, as in `ddim25`, selects deterministic DDIM sampling. The paper's
# 25-step rows (its Table 5) are DDIM's, whose update uses the predicted
# noise only: the learned variance plays no part in them. What it buys is
# ancestral sampling that keeps its quality with fewer steps (chapter 2).
#
# Guidance (chapter 6) shifts each step's mean by the scaled gradient of the
# classifier's log-probability of the wanted class, $s \, \Sigma \,
# \nabla_{x_t} \log p_\phi(y \mid x_t)$ (DDIM shifts its noise prediction
# instead, by a multiple of the same gradient). The classifier sees the
# noisy image
# at the model's original timestep, and chapter 6's `classifier_cond_fn`
# returns $s$ times the gradient, exactly as the reference's
# `classifier_sample.py` does. The labels are random ImageNet classes; an
# unconditional model is wrapped by `ignore_labels` so that the labels
# reach only the classifier. (`adm sample --model-flags ...` does all of
# this from the command line.)
#
# A released classifier has the size of its diffusion model. Where a model
# is handed images of another size (the stand-ins, or a 128 model's samples
# given to the 64 to 256 upsampler), `fit` resizes them: area averaging to
# shrink, bilinear to enlarge, both differentiable, so guidance still works.

# %%
def fit(images, size):
    """Images resized to size x size, unless they have that size already."""
    if images.shape[-1] == size:
        return images
    mode = "area" if size < images.shape[-1] else "bilinear"
    return F.interpolate(images, size=(size, size), mode=mode)


diffusion = diffusion_from_flags(f"{model_flags} "
                                 f"--timestep_respacing {respacing}")
flags = parse_flags(model_flags)
size = flags["image_size"]
classifier_size = parse_flags(classifier_flags)["image_size"]
labels = torch.randint(0, NUM_CLASSES, (num_samples,), device=device)
sampled = model if flags["class_cond"] else ignore_labels(model)


def resized_classifier(x, t):
    """The classifier, on images brought to its size."""
    return classifier(fit(x, classifier_size), t)


cond_fn = classifier_cond_fn(resized_classifier, classifier_scale)
loop = ddim_sample_loop if respacing.startswith("ddim") else p_sample_loop
print(f"{loop.__name__}: {diffusion.num_timesteps} steps, {num_samples} "
      f"images of {size}x{size}, classifier scale {classifier_scale}")
start = time.perf_counter()
samples = loop(diffusion, sampled, torch.randn(num_samples, 3, size, size,
                                               device=device),
               progress=True, model_kwargs={"y": labels},
               cond_fn=cond_fn if classifier_scale > 0 else None)
print(f"sampled in {time.perf_counter() - start:.1f} s")
assert samples.shape == (num_samples, 3, size, size)
assert torch.isfinite(samples).all()
assert samples.abs().max() <= 1 + 1e-5  # the last step returns clipped x_0

# %%
show_images(samples, [f"{size}px, class {y}" for y in labels.tolist()],
            size=2.0)
plt.show()

# %% [markdown]
# ## A.6 Classifying the samples
#
# The guidance classifier is an ImageNet classifier in its own right when
# told that the image is clean ($t = 0$). Its top-1 class is a rough check
# that guidance did its job: with the released models, guided samples should
# mostly be classified as the class asked for, while the stand-ins agree only
# by chance. ImageNet's class names are not part of the reference (nor
# available offline), so classes are shown by index.

# %%
clean = torch.zeros(num_samples, dtype=torch.long, device=device)
with torch.no_grad():
    logits = classifier(fit(samples, classifier_size), clean)
probs = logits.float().softmax(dim=-1)
top_p, top = probs.max(dim=-1)
for want, got, p in zip(labels.tolist(), top.tolist(), top_p.tolist(),
                        strict=True):
    print(f"asked for class {want:4d}: top-1 {got:4d} (p = {p:.3f})")
hits = (top == labels).float().mean().item()
print(f"top-1 agreement {hits:.0%}")
assert logits.shape == (num_samples, NUM_CLASSES)
assert torch.isfinite(logits).all()

# %% [markdown]
# ## A.7 Upsampling
#
# The upsampler is a diffusion model of the large image conditioned on the
# small one (chapter 3): the sampler starts from noise at the large size and
# the model sees the low-resolution image, bilinearly up-sampled, as three
# extra channels. Its diffusion comes from *its* flags, and it takes the
# labels too. It runs through chapter 7's `upsample`, the upsampler stage of
# the cascade, on the base samples as `uint8` images (what the reference's
# `super_res_sample.py` reads from its `--base_samples` file). The released
# upsamplers take exactly the output size of a released base model ($64$ or
# $128$); images of another size go through `fit` first.

# %%
up = parse_flags(upsampler_flags)
small, large = up["small_size"], up["large_size"]
low_res = fit(samples, small)
if small != size:
    print(f"resized the {size}x{size} samples to {small}x{small}")
# A stage is chapter 4's trained-model type, here read from the flags,
# and how it samples.
trained = TrainedModel(upsampler, diffusion_from_flags(upsampler_flags),
                       config_from_flags(upsampler_flags, "upsampler"),
                       Path(upsampler_path or "stand-in"), weights="reference")
up_stage = Stage(trained, respacing,
                 "ddim" if respacing.startswith("ddim") else "ddpm")
start = time.perf_counter()
upsampled = upsample(up_stage, uint8_nhwc(low_res), labels.cpu(),
                     batch_size=num_samples, device=device, seed=seed,
                     progress=True)
print(f"upsampled {small} -> {large} in {time.perf_counter() - start:.1f} s")
assert upsampled.shape == (num_samples, large, large, 3)
assert upsampled.dtype == np.uint8

# %% [markdown]
# Before and after, at the same displayed size:

# %%
_, axes = plt.subplots(2, num_samples, squeeze=False,
                       figsize=(2 * num_samples, 4.2))
upsampled = torch.from_numpy(upsampled).permute(0, 3, 1, 2) / 127.5 - 1
for row, batch, side in [(0, low_res, small), (1, upsampled, large)]:
    show_images(batch, [f"{side}px, class {y}" for y in labels.tolist()],
                axes[row])
plt.show()

# %% [markdown]
# ## A.8 Saving samples as the reference does
#
# The reference's sampling scripts write an `.npz` whose `arr_0` holds
# `uint8` images in NHWC order and `arr_1` the labels: the format its
# evaluator reads (chapter 5) and its upsampling script takes as
# `--base_samples`. `adm_lib.data.load_dataset` reads it too.

# %%
def to_uint8(images):
    """NCHW images in [-1, 1] as NHWC uint8, as the reference converts."""
    pixels = ((images + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


arr_0 = to_uint8(samples)
assert arr_0.dtype == np.uint8 and arr_0.shape == (num_samples, size, size, 3)
if save_samples:
    np.savez(save_samples, arr_0, labels.cpu().numpy())
    print(f"wrote {num_samples} samples and labels to {save_samples}")
else:
    print(f"arr_0 {arr_0.shape} {arr_0.dtype}; pass -p save_samples "
          "samples.npz to write them")
shutil.rmtree(scratch)  # the stand-ins' files

# %% [markdown]
# ## Summary
#
# * A released checkpoint is a state dict; the flags in the reference's
#   README (here, `RELEASED`) are the other half of the model. adm_lib builds
#   from them with `model_from_flags`, `classifier_from_flags` and
#   `upsampler_from_flags`, and `load_checkpoint` loads a file strictly.
# * A checkpoint loaded with a wrong flag fails with a message naming the
#   flag, except for the head counts and attention order, which no load can
#   check.
# * Sampling uses `diffusion_from_flags` on the model's flags plus
#   `--timestep_respacing`, with `p_sample_loop` or, for `ddim` spacings,
#   `ddim_sample_loop`; guidance passes the classifier's scaled gradient as
#   `cond_fn`, and an upsampler takes `low_res` and `y` as model arguments.
# * With no files, tiny stand-ins run the same code in seconds; with the
#   files and a GPU, the same cells sample the paper's models.

# %% [markdown]
# ## Exercises
#
# 1. `256x256_diffusion.pt` and `256x256_diffusion_uncond.pt` share their
#    flags but `--class_cond`. Predict how many more parameters the
#    conditional one has, then check with A.2's `counts`.
# 2. Predict the UNet's `out_channels` and `num_classes` for
#    `lsun_bedroom.pt`'s flags, then check with `unet_arguments`.
# 3. A.4 says a model built with the wrong head flags loads silently.
#    Predict whether a stand-in saved with `--num_head_channels 64` loads
#    with `--num_heads 4 --num_head_channels -1` instead, and whether it
#    then computes the same thing, then check.

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 1.** The class embedding, one vector of the timestep
# embedding's width, $4 \times 256 = 1024$, for each of 1,000 classes:
# 1,024,000 parameters. Nothing else depends on the labels.

# %% jupyter={"source_hidden": true} tags=["solution"]
extra = counts["256x256_diffusion"][0] - counts["256x256_diffusion_uncond"][0]
print(f"{extra:,} more parameters")
assert extra == 1000 * 4 * 256

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 2.** `--learn_sigma True` doubles the output channels, the
# mean's three and the variance's three: 6. `--class_cond False` leaves no
# class embedding: `num_classes` is `None`.

# %% jupyter={"source_hidden": true} tags=["solution"]
bedroom = unet_arguments(RELEASED["lsun_bedroom"][1])
print("out_channels", bedroom["out_channels"], "num_classes",
      bedroom["num_classes"])
assert bedroom["out_channels"] == 6 and bedroom["num_classes"] is None

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 3.** It loads: heads split the channels of one attention
# layer's projections, so no weight changes shape. It computes something
# else: the stand-in's one attention layer (in its middle block, 64
# channels) has one head of 64 channels by the right flags, and four heads
# of 16 by the wrong ones.

# %% jupyter={"source_hidden": true} tags=["solution"]
heads_path, heads_flags = save_stand_in("diffusion", model_flags)
right = load_checkpoint(heads_path, heads_flags)
wrong = load_checkpoint(heads_path,
                        f"{heads_flags} --num_heads 4 --num_head_channels -1")
x = torch.randn(2, 3, 32, 32)
t = torch.tensor([10, 500])
kwargs = {"y": torch.tensor([1, 2])} if parse_flags(heads_flags)[
    "class_cond"] else {}
with torch.no_grad():
    gap = (right(x, t, **kwargs) - wrong(x, t, **kwargs)).abs().max().item()
print(f"loaded with the wrong heads; largest output difference {gap:.2e}")
assert gap > 1e-4
shutil.rmtree(scratch)
