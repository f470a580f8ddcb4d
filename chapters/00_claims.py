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
# # What the paper claims
#
# In 2021, GANs held the state of the art in image synthesis as sample
# quality metrics such as FID measure it, yet they cover less of the data
# distribution than likelihood-based models and are hard to train: they
# collapse without carefully chosen hyperparameters and regularizers.
# Diffusion models are likelihood-based: they cover the distribution, train
# on a stationary objective and scale easily, but their FID still lagged
# behind BigGAN-deep on ImageNet. *Diffusion Models Beat GANs on Image
# Synthesis* (Dhariwal & Nichol, arXiv 2105.05233) closes the gap in three
# steps: **(a)** a better UNet, found by ablations; **(b)** classifier
# guidance, one knob that trades diversity for fidelity; **(c)** guidance
# combined with upsampling diffusion models.
#
# Before building anything, this chapter writes down what the paper claims,
# as data: its tables (numbered as in arXiv v4), each with assertions that
# check the paper's sentences against its own numbers. Then it maps the
# chapters of the book onto those claims (0.6), says how to run each one
# (0.7), sets each claim against what the book's own runs show (0.8) and
# lists what the paper says that the book leaves out (0.9).

# %% tags=["parameters"]
# Smoke configuration: nothing trains here; the chapter reads the paper's
# tables and the book's chapters in about a second, on any machine.
#   adm book run 0 -p figure_dpi 150
figure_dpi: int = 100  # resolution of the chapter's figures

# %%
import os
import re

import matplotlib.pyplot as plt
import numpy as np

from adm_lib.book import (
    Book,
    chapter_modules,
    chapter_title,
    find_root,
    read_cells,
)

# Relative paths, the parameters' too, start at the book's root, as under
# `adm book run`, wherever the kernel starts (JupyterLab: in chapters/).
os.chdir(find_root())


def show_table(header: list[str], rows: list[list]) -> None:
    """Print rows as an aligned table, floats with the paper's 2 decimals."""
    cells = [header] + [["-" if v is None else f"{v:.2f}"
                         if isinstance(v, float) else str(v) for v in row]
                        for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w)
                        for c, w in zip(row, widths, strict=True)).rstrip())


# %% [markdown]
# ## 0.1 The headline
#
# The paper scores samples with five numbers, each computed from the
# features of a pretrained Inception-v3 network on 50,000 samples against
# a reference batch of real images (chapter 5 builds them all):
#
# * **FID** (lower is better): the Fréchet distance between Gaussians fit
#   to the real and the generated features; it sees fidelity and diversity
#   at once. **sFID** is the same on spatial features, so it sees layout.
# * **IS**, the Inception Score (higher is better): how confidently and how
#   variously the classifier names the samples' classes; it never looks at
#   real images.
# * **Precision** (fidelity): the share of samples that fall inside the
#   real images' feature manifold; **recall** (diversity): the share of
#   real images that fall inside the samples' manifold.
#
# The abstract gives one FID (lower is better) per ImageNet resolution for
# the guided model ADM-G, and two more for ADM-G followed by an upsampling
# model, ADM-U. We keep them as a dictionary and find each one again in the
# tables below.

# %%
ABSTRACT_FID = {  # (task, model): FID
    ("ImageNet 128", "ADM-G"): 2.97,
    ("ImageNet 256", "ADM-G"): 4.59,
    ("ImageNet 512", "ADM-G"): 7.72,
    ("ImageNet 256", "ADM-G, ADM-U"): 3.94,
    ("ImageNet 512", "ADM-G, ADM-U"): 3.85,
}
show_table(["task", "model", "FID"],
           [[task, model, fid] for (task, model), fid in ABSTRACT_FID.items()])

# %% [markdown]
# ## 0.2 The architecture (Tables 1 to 3)
#
# All ablations train on ImageNet 128 with batch size 256 and sample with
# 250 steps. Table 1 starts from a UNet with 160 channels, 2 residual blocks
# per resolution, one attention head at $16 \times 16$, and changes one thing
# at a time; its numbers are the change in FID from that baseline, after
# 700K and 1200K iterations. The paper: "Aside from rescaling residual
# connections, all of the other modifications improve performance and have
# a positive compounding effect."

# %%
TABLE1_BASELINE = (15.33, 13.21)  # FID at 700K and 1200K iterations
TABLE1 = {  # change: FID change at 700K, at 1200K
    "depth 4 (128 channels)": (-0.21, -0.48),
    "4 heads": (-0.54, -0.82),
    "attention at 32,16,8": (-0.72, -0.66),
    "BigGAN up/downsampling": (-1.20, -1.21),
    "rescaled residuals": (0.16, 0.25),
    "4 heads + 32,16,8 + BigGAN": (-3.14, -3.00),
}
show_table(["change", "dFID 700K", "dFID 1200K"],
           [["baseline (FID)", *TABLE1_BASELINE]]
           + [[name, *deltas] for name, deltas in TABLE1.items()])
for name, deltas in TABLE1.items():
    assert all(d > 0 for d in deltas) == (name == "rescaled residuals")
parts = ["4 heads", "attention at 32,16,8", "BigGAN up/downsampling"]
for i in range(2):  # the combination beats the sum of its parts
    combined = TABLE1["4 heads + 32,16,8 + BigGAN"][i]
    assert combined < sum(TABLE1[p][i] for p in parts)
    assert combined == min(deltas[i] for deltas in TABLE1.values())

# %% [markdown]
# Table 2 fixes either the number of heads or the channels per head (128
# base channels, multi-resolution attention, BigGAN up/downsampling, 700K
# iterations): "more heads or lower channels per heads both lead to improved
# FID". More heads improve it steadily; among widths per head 32 has the
# lowest FID, yet 64 is not better than 128. The paper keeps 64 for its
# wall-clock time (its Figure 2). Table 3 keeps adaptive group normalization
# (AdaGN), which applies the timestep and class embedding as a scale and a
# shift after GroupNorm, over the "Addition + GroupNorm" of Ho et al.

# %%
TABLE2_BASELINE = 14.08  # FID with 1 head
TABLE2_HEADS = {2: -0.50, 4: -0.97, 8: -1.17}  # heads: FID change
TABLE2_CHANNELS = {32: -1.36, 64: -1.03, 128: -1.08}  # per head: change
TABLE3 = {"AdaGN": 13.06, "Addition + GroupNorm": 15.08}  # FID
show_table(["attention", "dFID"],
           [["1 head (FID)", TABLE2_BASELINE]]
           + [[f"{h} heads", d] for h, d in TABLE2_HEADS.items()]
           + [[f"{c} channels per head", d]
              for c, d in TABLE2_CHANNELS.items()])
show_table(["embedding operation", "FID"], [[*kv] for kv in TABLE3.items()])
heads = list(TABLE2_HEADS.values())
assert heads == sorted(heads, reverse=True)  # more heads, lower FID
assert all(d < 0 for d in [*heads, *TABLE2_CHANNELS.values()])
assert min(TABLE2_CHANNELS, key=TABLE2_CHANNELS.get) == 32
assert TABLE2_CHANNELS[64] > TABLE2_CHANNELS[128]  # not monotone
assert TABLE3["AdaGN"] < TABLE3["Addition + GroupNorm"]

# %% [markdown]
# ## 0.3 Classifier guidance (Table 4)
#
# Table 4 samples an unconditional and a conditional model, both trained for
# 2M iterations on ImageNet 256 with batch size 256, without guidance and
# with a classifier's gradients scaled by $s = 1$ and $s = 10$. Precision
# and IS measure fidelity, recall measures diversity. Three sentences of the
# paper to check: guidance improves precision at the cost of recall; with a
# high enough scale the guided unconditional model gets close to the FID of
# the unguided conditional one, "although training directly with the class
# labels still helps"; and guiding a conditional model further improves
# FID. At $s = 1$ the unconditional model gets *worse*: Section 4.3 found a
# scale larger than 1 necessary for unconditional models.

# %%
TABLE4 = [  # conditional, scale (None: unguided), FID, sFID, IS, prec, rec
    (False, None, 26.21, 6.35, 39.70, 0.61, 0.63),
    (False, 1.0, 33.03, 6.99, 32.92, 0.56, 0.65),
    (False, 10.0, 12.00, 10.40, 95.41, 0.76, 0.44),
    (True, None, 10.94, 6.02, 100.98, 0.69, 0.63),
    (True, 1.0, 4.59, 5.25, 186.70, 0.82, 0.52),
    (True, 10.0, 9.11, 10.93, 283.92, 0.88, 0.32),
]
show_table(["conditional", "scale", "FID", "sFID", "IS", "prec", "rec"],
           [["yes" if c else "no", "-" if s is None else str(s), *rest]
            for c, s, *rest in TABLE4])
t4 = {(c, s): dict(zip(["fid", "sfid", "is", "prec", "rec"], rest,
                       strict=True)) for c, s, *rest in TABLE4}
for cond in (False, True):
    assert t4[cond, 10.0]["prec"] > t4[cond, None]["prec"]
    assert t4[cond, 10.0]["rec"] < t4[cond, None]["rec"]
    assert t4[cond, 10.0]["is"] > t4[cond, None]["is"]
    assert t4[cond, 10.0]["fid"] < t4[cond, None]["fid"]
assert t4[False, 1.0]["fid"] > t4[False, None]["fid"]  # s = 1 is too weak
assert t4[True, None]["fid"] < t4[False, 10.0]["fid"]  # labels still help
assert t4[True, 1.0]["fid"] == min(row["fid"] for row in t4.values())

# %% [markdown]
# ## 0.4 Against the GANs (Table 5)
#
# Table 5 compares with the best earlier models of each task; we keep, per
# task, the strongest competitor and the paper's models. ADM is the ablated
# model; ADM-G adds classifier guidance; "25 steps" samples with DDIM in 25
# steps instead of 250. LSUN models are unconditional, so no guidance there.
# BigGAN-deep at 64 was trained by the authors (\*), and LOGAN's FID is
# quoted from its paper, with no other metric (†). The claims: the best FID
# on every task; matching BigGAN-deep "with as few as 25 forward passes";
# more coverage (recall) than the GAN, whose precision stays higher. And
# guidance is what wins at high resolution: unguided, the new architecture
# beats BigGAN-deep at 128 but not at 256 or 512.

# %%
TABLE5 = {  # task: {model: (FID, sFID, precision, recall)}
    "LSUN Bedrooms": {"StyleGAN": (2.35, 6.62, 0.59, 0.48),
                      "ADM (dropout)": (1.90, 5.59, 0.66, 0.51)},
    "LSUN Horses": {"StyleGAN2": (3.84, 6.46, 0.63, 0.48),
                    "ADM (dropout)": (2.57, 6.81, 0.71, 0.55)},
    "LSUN Cats": {"StyleGAN2": (7.25, 6.33, 0.58, 0.43),
                  "ADM (dropout)": (5.57, 6.69, 0.63, 0.52)},
    "ImageNet 64": {"BigGAN-deep*": (4.06, 3.96, 0.79, 0.48),
                    "IDDPM": (2.92, 3.79, 0.74, 0.62),
                    "ADM (dropout)": (2.07, 4.29, 0.74, 0.63)},
    "ImageNet 128": {"BigGAN-deep": (6.02, 7.18, 0.86, 0.35),
                     "LOGAN†": (3.36, None, None, None),
                     "ADM": (5.91, 5.09, 0.70, 0.65),
                     "ADM-G (25 steps)": (5.98, 7.04, 0.78, 0.51),
                     "ADM-G": (2.97, 5.09, 0.78, 0.59)},
    "ImageNet 256": {"BigGAN-deep": (6.95, 7.36, 0.87, 0.28),
                     "ADM": (10.94, 6.02, 0.69, 0.63),
                     "ADM-G (25 steps)": (5.44, 5.32, 0.81, 0.49),
                     "ADM-G": (4.59, 5.25, 0.82, 0.52)},
    "ImageNet 512": {"BigGAN-deep": (8.43, 8.13, 0.88, 0.29),
                     "ADM": (23.24, 10.19, 0.73, 0.60),
                     "ADM-G (25 steps)": (8.41, 9.67, 0.83, 0.47),
                     "ADM-G": (7.72, 6.57, 0.87, 0.42)},
}
show_table(["task", "model", "FID", "sFID", "prec", "rec"],
           [[task, model, *row] for task, models in TABLE5.items()
            for model, row in models.items()])
for task, models in TABLE5.items():
    best = min(models, key=lambda m: models[m][0])
    assert best.startswith("ADM"), (task, best)
for res in (128, 256, 512):
    row = TABLE5[f"ImageNet {res}"]
    gan, ours = row["BigGAN-deep"], row["ADM-G"]
    fast = row["ADM-G (25 steps)"]
    assert ours[0] < gan[0] and fast[0] < gan[0]  # FID, even at 25 steps
    assert ours[3] > gan[3] and ours[2] < gan[2]  # more recall, less prec.
    # Unguided, ADM beats the GAN at 128 only: guidance wins the rest.
    assert (row["ADM"][0] < gan[0]) == (res == 128)

# %% [markdown]
# ## 0.5 Guidance and upsampling (Table 6)
#
# The alternative to one big model is a cascade: a low-resolution model
# (base 64 for 256, 128 for 512) and an upsampling diffusion model, ADM-U,
# conditioned on its samples. Table 6 gives the sampling steps of each stage
# and IS as well. The paper: upsampling improves precision while keeping a
# high recall, guidance trades recall for much higher precision, and guiding
# the low-resolution model before upsampling gives the best FIDs.

# %%
TABLE6 = [  # task, model, base steps, upsampler steps, FID, sFID, IS, P, R
    ("ImageNet 256", "ADM", 250, None, 10.94, 6.02, 100.98, 0.69, 0.63),
    ("ImageNet 256", "ADM-U", 250, 250, 7.49, 5.13, 127.49, 0.72, 0.63),
    ("ImageNet 256", "ADM-G", 250, None, 4.59, 5.25, 186.70, 0.82, 0.52),
    ("ImageNet 256", "ADM-G, ADM-U", 250, 250,
     3.94, 6.14, 215.84, 0.83, 0.53),
    ("ImageNet 512", "ADM", 250, None, 23.24, 10.19, 58.06, 0.73, 0.60),
    ("ImageNet 512", "ADM-U", 250, 250, 9.96, 5.62, 121.78, 0.75, 0.64),
    ("ImageNet 512", "ADM-G", 250, None, 7.72, 6.57, 172.71, 0.87, 0.42),
    ("ImageNet 512", "ADM-G, ADM-U", 25, 25,
     5.96, 12.10, 187.87, 0.81, 0.54),
    ("ImageNet 512", "ADM-G, ADM-U", 250, 25,
     4.11, 9.57, 219.29, 0.83, 0.55),
    ("ImageNet 512", "ADM-G, ADM-U", 250, 250,
     3.85, 5.86, 221.72, 0.84, 0.53),
]
show_table(["task", "model", "S_base", "S_up", "FID", "sFID", "IS", "prec",
            "rec"], [list(row) for row in TABLE6])
t6 = {(task, m, b, u): r for task, m, b, u, *r in TABLE6}
for task in ("ImageNet 256", "ImageNet 512"):
    rows = {k[1:]: r for k, r in t6.items() if k[0] == task}
    adm, up = rows["ADM", 250, None], rows["ADM-U", 250, 250]
    assert up[3] > adm[3] and up[4] >= adm[4]  # precision up, recall kept
    guided = rows["ADM-G", 250, None]
    assert guided[3] > up[3] and guided[4] < up[4]  # trades recall
    best = min(rows, key=lambda k: rows[k][0])
    assert best == ("ADM-G, ADM-U", 250, 250)

# %% [markdown]
# The tables share models, so they must agree: Table 4's conditional model
# is Table 6's ADM at 256, Table 5's ADM-G rows are in Table 6, and each
# of the abstract's numbers is a row of Table 5 or 6.

# %%
for task, model, _, up, fid, sfid, _, prec, rec in TABLE6:
    if up is None:
        assert TABLE5[task][model] == (fid, sfid, prec, rec)
for scale, model in ((None, "ADM"), (1.0, "ADM-G")):
    fid, sfid, inception, prec, rec = t4[True, scale].values()
    assert t6["ImageNet 256", model, 250, None] == [fid, sfid, inception,
                                                    prec, rec]
for (task, model), fid in ABSTRACT_FID.items():
    in_table5 = TABLE5.get(task, {}).get(model, (None,))[0] == fid
    in_table6 = any(k[:2] == (task, model) and r[0] == fid
                    for k, r in t6.items())
    assert in_table5 or in_table6, (task, model)
print("Tables 4, 5, 6 and the abstract agree where they overlap")

# %% [markdown]
# One figure sums it up: FID against resolution for the GAN, the unguided
# and guided diffusion models, and the guided cascade (Tables 5 and 6).

# %%
resolutions = [128, 256, 512]
x = np.arange(len(resolutions))
curves = {m: [TABLE5[f"ImageNet {r}"][m][0] for r in resolutions]
          for m in ("BigGAN-deep", "ADM", "ADM-G")}
cascade = [t6[f"ImageNet {r}", "ADM-G, ADM-U", 250, 250][0]
           for r in resolutions[1:]]
fig, ax = plt.subplots(figsize=(6, 3.5), dpi=figure_dpi,
                       layout="constrained")
for model, fids in curves.items():
    ax.plot(x, fids, marker="o", label=model)
ax.plot(x[1:], cascade, marker="s", label="ADM-G, ADM-U (Table 6)")
ax.set(xticks=x, xticklabels=[f"{r}x{r}" for r in resolutions],
       xlabel="ImageNet resolution", ylabel="FID (lower is better)",
       title="Tables 5 and 6: FID by resolution")
ax.legend()
plt.show()

# %% [markdown]
# ## 0.6 The map of the book
#
# Each chapter rebuilds one part of these claims and exports it to
# `adm_lib`; the reference implementation (`openai/guided-diffusion`) is
# the yardstick. The map below is checked against `book.toml`: every chapter
# of the book must be in it, with the modules it really exports.

# %%
BOOK_MAP = {  # chapter: (the claims it rebuilds, the modules it exports)
    "00_claims.py": ("the claims: Tables 1 to 6", ()),
    "01_forward.py": ("Section 2: the noising process a diffusion model "
                      "reverses", ("adm_lib.forward",)),
    "02_diffusion.py": ("Section 2.1: learned variance, hybrid loss, DDIM "
                        "(25 steps)",
                        ("adm_lib.diffusion", "adm_lib.toy")),
    "03_architecture.py": ("Section 3, Tables 1-3: the ADM UNet; the "
                           "classifier, the upsampler", ("adm_lib.unet",)),
    "04_training.py": ("Appendix I, Tables 11-13: the training recipes",
                       ("adm_lib.train", "adm_lib.config", "adm_lib.batches",
                        "adm_lib.objectives", "adm_lib.runlog")),
    "05_metrics.py": ("Section 2.2: FID, sFID, IS, precision, recall; "
                      "Table 1's ablations, trained small",
                      ("adm_lib.metrics", "adm_lib.models")),
    "06_guidance.py": ("Section 4, Algorithms 1-2, Table 4; and "
                       "classifier-free guidance", ("adm_lib.guidance",)),
    "07_cascades.py": ("Table 6: upsampling diffusion and the guided "
                       "cascade", ("adm_lib.cascade",)),
    "08_solvers.py": ("beyond the paper: guided sampling in ten steps "
                      "with DPM-Solver++ and EDM's Heun sampler",
                      ("adm_lib.solvers",)),
    "appendix_checkpoints.py": ("the reference's released checkpoints", ()),
    "appendix_runs.py": ("the engineering of runs: validation, checkpoint "
                         "files, locks, exact resume, ranks", ()),
    "appendix_measurements.py": ("the measurements behind the chapters' "
                                 "conclusions: dated runs, machines, raw "
                                 "tables", ()),
}
book = Book.load()
for chapter in book.chapters:
    assert chapter.name in BOOK_MAP, f"{chapter.name} is not in the map"
    claims, modules = BOOK_MAP[chapter.name]
    exported = tuple(
        ".".join(path.relative_to(book.root).with_suffix("").parts)
        for path, _ in chapter_modules(book, chapter))
    assert sorted(exported) == sorted(modules), (chapter.name, exported)
    print(f"{chapter.stem}: {chapter_title(chapter)}\n"
          f"    rebuilds {claims}\n    exports {', '.join(modules) or '-'}")
assert set(BOOK_MAP) - {c.name for c in book.chapters} <= {"00_claims.py"}

# %% [markdown]
# The same map as a picture: the paper's system from noise to a scored
# image, each piece labelled with the chapter that builds it. Sampling
# runs left to right; the classifier steers the base model (guidance),
# and the upsampler takes the base model's small samples to full size.

# %% jupyter={"source_hidden": true}
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

PIECES = {  # name: (x, y, label, chapter)
    "noise": (0.9, 2.0, "noise $x_T$\n(forward process,\nschedules)", 1),
    "base": (3.3, 2.0, "ADM base model\nUNet, learned $\\Sigma_\\theta$\n"
             "ancestral / DDIM", 2),
    "unet": (3.3, 0.45, "the UNet: attention,\nBigGAN resampling,\nAdaGN", 3),
    "train": (0.9, 0.45, "training: presets,\nbf16 / fp16, EMA", 4),
    "clf": (3.3, 3.55, "noisy classifier\n$p_\\phi(y \\mid x_t)$", 6),
    "guide": (5.7, 3.55, "guidance: mean\nshifted by\n"
              "$s\\Sigma\\nabla \\log p_\\phi$", 6),
    "up": (5.7, 2.0, "ADM-U upsampler\n64 \u2192 256,\n128 \u2192 512", 7),
    "score": (8.1, 2.0, "FID, sFID, IS,\nprecision, recall", 5),
}
ARROWS = [("noise", "base"), ("base", "up"), ("up", "score"),
          ("unet", "base"), ("train", "unet"), ("clf", "guide"),
          ("guide", "base")]
fig, ax = plt.subplots(figsize=(9, 4.6), dpi=figure_dpi)
colours = plt.get_cmap("tab10")
for x, y, label, chapter_number in PIECES.values():
    ax.add_patch(FancyBboxPatch((x - 1.0, y - 0.6), 2.0, 1.2,
                                boxstyle="round,pad=0.05",
                                facecolor=colours(chapter_number - 1),
                                alpha=0.25, edgecolor="black"))
    ax.text(x, y + 0.12, label, ha="center", va="center", fontsize=8)
    ax.text(x, y - 0.48, f"chapter {chapter_number}", ha="center",
            va="center", fontsize=8, fontweight="bold")
for start, end in ARROWS:
    (x0, y0, *_), (x1, y1, *_) = PIECES[start], PIECES[end]
    if y0 == y1:  # along a row: edge to edge
        x0, x1 = x0 + 1.05 * np.sign(x1 - x0), x1 - 1.05 * np.sign(x1 - x0)
    elif x0 == x1:  # along a column: top to bottom
        y0, y1 = y0 + 0.65 * np.sign(y1 - y0), y1 - 0.65 * np.sign(y1 - y0)
    else:  # guidance comes back to the base model from above right
        x0, y0, x1, y1 = x0 - 0.4, y0 - 0.65, x1 + 1.05, y1 + 0.3
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>",
                                 mutation_scale=14, color="black"))
ax.set(xlim=(-0.3, 9.3), ylim=(-0.3, 4.3),
       title="The paper's pieces, and the chapter that builds each")
ax.axis("off")
plt.show()
# Every chapter that rebuilds a piece of the paper is in the picture.
assert {c for *_, c in PIECES.values()} == set(range(1, 8))

# %% [markdown]
# ## 0.7 Running the chapters
#
# The first command to try is `adm demo`: classifier guidance end to end,
# on the embedded MNIST-5k, in minutes on a CPU (see the README). Then each
# chapter runs on its own with `adm book run N`. Its `parameters` cell holds
# the *smoke configuration*, seconds to minutes on a CPU, and its comment
# gives the commands of the full runs, which override those parameters with
# papermill (`-p name value`), most of them on a GPU (`-p device cuda`).
# `adm book run` takes a chapter's number or name (`adm book run forward`).
# papermill itself reads notebooks only, so pipe a chapter through Jupytext:
# `jupytext --to ipynb -o - chapters/01_forward.py | papermill - out.ipynb
# -p num_timesteps 4000`, with `-y 'name: [1, 2]'` for a list (`-p` would
# pass it as a string); `papermill --help-notebook -` lists the parameters.
# To read and run the chapters as notebooks, `adm book lab` opens them in
# JupyterLab. Here are the full runs, read from the chapters themselves:

# %%
for chapter in book.chapters:
    cell, = (c for c in read_cells(chapter) if "parameters" in c.tags)
    lines = cell.source.splitlines()
    code = next(i for i, line in enumerate(lines) if line[:1] != "#")
    comment = [line[2:] for line in lines[:code]]
    assert "adm book run" in "\n".join(comment), chapter.name
    print(f"{chapter.stem}: {chapter_title(chapter)}")
    print("\n".join(f"    {line}" for line in comment), end="\n\n")

# %% [markdown]
# Be clear about what these runs show. The guided ImageNet 256 model of
# Table 5 took 962 V100-days of training (the paper's Table 10); on a CPU
# the book trains tiny models on MNIST for minutes. None of its runs
# reproduces the numbers above, and neither do its GPU runs, on MNIST or
# CIFAR-10. They show the *mechanisms*: a learned variance, the ablations
# as switches, the fidelity-diversity trade-off of guidance. What shows
# that the code *is* the paper's are the parity tests (`pytest -m parity`),
# which compare adm_lib with numbers the reference implementation produced,
# and the appendix, which runs the reference's released checkpoints with
# adm_lib.

# %% [markdown]
# ## 0.8 The claims against the book's evidence
#
# What each of the paper's claims becomes in this book: what its small runs
# reproduce (and where), what they contradict, and what they leave
# untested. "Small" means minutes to a quarter of an hour on a 2-core CPU,
# on MNIST-5k or CIFAR-10, scored with small data-set classifiers in place
# of Inception; a gap counts only when it exceeds twice its standard error.
# The table is data, as the paper's tables above are: the cell checks that
# every section it cites exists, so that it cannot point at a section that
# has gone.

# %%
from IPython.display import Markdown, display

CLAIMS = [  # (the paper's claim, reproduced small (where), contradicted,
    #          left untested)
    ("The UNet's changes (more heads, attention at 32, 16 and 8, BigGAN "
     "resampling, AdaGN) each lower FID, and together more than the sum "
     "(Tables 1 to 3)",
     "each change as a switch, with the released models' exact parameter "
     "counts and the reference's outputs (§3.9 to §3.11); trained at equal "
     "steps and equal time and judged by a held-out bound (§5.10)",
     "nothing",
     "the FID gains: the one CPU-scale run (M.4) left every variant near "
     "its initialisation, within two or three paired standard errors of "
     "the baseline; it showed only the cost, attention at 32x32 taking 2.5 "
     "times the baseline's time a step"),
    ("A learned variance (the hybrid loss) keeps sample quality with fewer "
     "steps (Section 2.1, after Nichol & Dhariwal)",
     "the parameterisation, the bound and the objectives, equal to the "
     "reference (§2.1 to §2.3); learned against fixed variance sampled in "
     "10 to 100 steps on small MNIST-5k models (§5.9)",
     "nothing",
     "the claim at scale; and Table 5's 25-step rows are DDIM, where the "
     "learned variance plays no part, so they do not test it"),
    ("Guidance trades diversity for fidelity: precision and IS up, recall "
     "down (Table 4)",
     "the conditional model on MNIST-5k (§6.9): accuracy, IS and FID "
     "improve with the scale; its recall falls, but by less than two "
     "standard errors",
     "the guided unconditional model's recall does not fall at s = 4 "
     "(§6.9), where Table 4's does",
     "ImageNet, and the scale of 10"),
    ("An unconditional model guided hard nears the conditional model, but "
     "labels still help (Table 4)",
     "§6.9: at s = 4 the unconditional model puts far more samples in "
     "their class than unguided, and stays behind the conditional model",
     "nothing",
     "FID at the paper's scales; Table 4's worse FID at s = 1 is within "
     "error in §6.9"),
    ("Guiding a conditional model improves its FID, best at s = 1 "
     "(Table 4)",
     "§6.9: FID improves from s = 0 to s = 1",
     "nothing",
     "the best scale: §6.9 cannot tell s = 1 from s = 4 within its errors"),
    ("ADM-G beats BigGAN-deep's FID at every ImageNet resolution, with 25 "
     "DDIM steps too; more recall, less precision (Table 5)",
     "nothing: the book trains no GAN and nothing on ImageNet",
     "nothing",
     "all of it; the released checkpoints run with adm_lib (A.5), but "
     "their FIDs need 50,000 samples on a GPU"),
    ("An upsampler (ADM-U) beats one model at full size, precision up and "
     "recall kept; a guided base model and ADM-U are best (Table 6)",
     "the shape on MNIST-5k and CIFAR-10 (§7.7): the upsampler adds "
     "detail that bilinear enlargement lacks, and with conditioning "
     "augmentation the cascade is level with the full-size model on "
     "CIFAR-10",
     "without augmentation the cascade is worse than the full-size model "
     "on CIFAR-10 (§7.7), where the paper's ADM-U, which has none, beats "
     "ADM; precision up with recall kept does not appear",
     "ImageNet; the guided cascade's lead over the unguided augmented one "
     "is within error (§7.7)"),
    ("The released models are the paper's (its code release)",
     "their state dicts load unchanged and give the reference's outputs to "
     "float32 round-off (§3.9, §3.10, A.3)",
     "nothing",
     "their samples' FIDs"),
    ("Models train in fp16 with loss scaling (the paper's appendix)",
     "fp16 with a loss scaler, and bf16 autocast (§4.5); bf16 losses equal "
     "float32's within 0.15 standard errors on CPUs (M.2); why the book "
     "defaults to bf16 (R.8)",
     "nothing",
     "fp16 on a GPU, where the paper used it: no GPU has run the book yet"),
]
header = ["the paper's claim", "reproduced small (where)", "contradicted",
          "left untested"]
display(Markdown("\n".join(
    ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    + ["| " + " | ".join(row) + " |" for row in CLAIMS])))

SECTION_FILES = {"A": "appendix_checkpoints.py", "R": "appendix_runs.py",
                 "M": "appendix_measurements.py"}
cited = set()
for row in CLAIMS:
    assert len(row) == len(header) and all(row), row[0]
    text = " ".join(row)
    cited |= set(re.findall(r"§(\d)\.(\d+)", text))
    cited |= set(re.findall(r"\b([ARM])\.(\d+)\b", text))
for part, section in sorted(cited):
    name = SECTION_FILES.get(part) or next(
        c.name for c in book.chapters if c.name.startswith(f"0{part}_"))
    headings = "\n".join(c.source for c in read_cells(book.src / name)
                         if c.kind == "markdown")
    assert f"## {part}.{section} " in headings, (part, section, name)
print(f"{len(CLAIMS)} claims; the {len(cited)} sections they cite exist")

# %% [markdown]
# ## 0.9 What the paper says that the book skips
#
# * **Compute.** Table 10's training costs (962 V100-days for the guided
#   ImageNet 256 model) and the sampling cost against GANs: the book
#   trains for minutes, and a GAN samples in one forward pass where ADM
#   takes 25 to 250.
# * **The classifiers' training details.** The paper's classifiers train
#   on random crops (chapter 4, section 4.2, notes that ours train on the
#   centre crop); their attention pooling at 8x8 is built in §3.7.
# * **Mixed precision.** The paper trains in fp16 with loss scaling; the
#   book defaults to bf16, and appendix R.8 says why.
# * **Section 7, limitations and related work.** Sampling is slower than a
#   GAN's; classifier guidance needs labelled data and a classifier trained
#   on noisy images; the paper places itself among score-based models
#   (Song et al.), cascaded diffusion (Ho et al., whose conditioning
#   augmentation chapter 7 uses) and super-resolution by diffusion (SR3,
#   Saharia et al., after which chapter 3's upsampler is modelled).
# * **LSUN.** Table 5's unconditional LSUN models are not trained here.
# * **Memorisation.** Whether samples copy training images is not
#   checked by the paper's metrics: exercise 4 shows why precision and
#   recall do not see it; a nearest-neighbour search of samples against
#   the training set does.
#
# Chapter 1 starts where every diffusion model starts: with noise.

# %% [markdown]
# ## Exercises
#
# 1. Predict which row of Table 4 has the highest precision and which the
#    highest recall, and what that says about the scale, then check with
#    `t4`.
# 2. Predict from Table 6 whether upsampling (ADM to ADM-U) or guidance
#    (ADM to ADM-G) lowers FID more, at 256 and at 512, then check.
# 3. FID is $\lVert \mu_a - \mu_b \rVert^2 + \operatorname{tr}(\Sigma_a +
#    \Sigma_b - 2 (\Sigma_a \Sigma_b)^{1/2})$. Predict the FID between
#    features $a \sim \mathcal{N}(0, I)$ in 16 dimensions and $b = a + 0.5$,
#    then check on 4,000 draws with chapter 5's `frechet_distance`.
# 4. A model that only returns copies of 100 of 1,000 real images has
#    memorised them. Predict its precision and recall (chapter 5's
#    $k = 3$ manifolds) on Gaussian features in 8 dimensions, then check
#    with `precision_recall`.

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 1.** The highest precision (0.88) and the lowest recall
# (0.32) are the conditional model at $s = 10$; the highest recall (0.65)
# is the unconditional model at $s = 1$, where guidance is too weak to
# move it. Precision rises and recall falls as the scale grows: the trade
# that section 0.3 checks.

# %% jupyter={"source_hidden": true} tags=["solution"]
best_precision = max(t4, key=lambda k: t4[k]["prec"])
best_recall = max(t4, key=lambda k: t4[k]["rec"])
print("highest precision:", best_precision, "highest recall:", best_recall)
assert best_precision == (True, 10.0) and best_recall == (False, 1.0)

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 2.** Guidance, at both: at 256 it takes FID from 10.94 to
# 4.59 against the upsampler's 7.49, and at 512 from 23.24 to 7.72 against
# 9.96. The two combine: the guided cascade is best at both resolutions.

# %% jupyter={"source_hidden": true} tags=["solution"]
for task in ("ImageNet 256", "ImageNet 512"):
    adm = t6[task, "ADM", 250, None][0]
    upsampled = adm - t6[task, "ADM-U", 250, 250][0]
    guided = adm - t6[task, "ADM-G", 250, None][0]
    print(f"{task}: upsampling -{upsampled:.2f}, guidance -{guided:.2f}")
    assert guided > upsampled

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 3.** A shift leaves the covariances equal, so the trace term
# is zero up to sampling error and FID is $\lVert 0.5 \cdot \mathbf{1}
# \rVert^2 = 16 \times 0.25 = 4$. Real feature sets are not Gaussian, which
# is why FID sees only two moments of them (chapter 5).

# %% jupyter={"source_hidden": true} tags=["solution"]
from adm_lib.metrics import (
    feature_statistics,
    frechet_distance,
    precision_recall,
)

draws = np.random.default_rng(0).standard_normal((4000, 16))
fid = frechet_distance(feature_statistics(draws),
                       feature_statistics(draws + 0.5))
print(f"FID of a shift by 0.5 in 16 dimensions: {fid:.3f}")
assert abs(fid - 4.0) < 1e-6

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 4.** Precision is exactly 1: every sample is a real image, so
# it lies in the real manifold. Recall is high too (0.86 with this seed):
# the $k$-nearest-neighbour balls of 100 points are wide, so they cover
# most real images. Neither number flags the copying, which is why a
# memorisation check compares each sample with its nearest training image.

# %% jupyter={"source_hidden": true} tags=["solution"]
real = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32)
precision, recall = precision_recall(real, real[:100].copy())
print(f"copies of 10% of the data: precision {precision:.3f}, "
      f"recall {recall:.3f}")
assert precision == 1.0 and recall > 0.5
