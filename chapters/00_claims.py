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
# chapters of the book onto those claims and says how to run each one.

# %% tags=["parameters"]
# Smoke configuration: nothing trains here; the chapter reads the paper's
# tables and the book's chapters in about a second, on any machine.
#   adm book run 0 -p figure_dpi 150
figure_dpi: int = 100  # resolution of the chapter's one figure

# %%
import os

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
                        ("adm_lib.diffusion",)),
    "03_architecture.py": ("Section 3, Tables 1-3: the ADM UNet; the "
                           "classifier, the upsampler", ("adm_lib.unet",)),
    "04_training.py": ("Appendix I, Tables 11-13: the training recipes",
                       ("adm_lib.train", "adm_lib.config", "adm_lib.batches",
                        "adm_lib.objectives", "adm_lib.runlog",
                        "adm_lib.models")),
    "05_metrics.py": ("Section 2.2: FID, sFID, IS, precision, recall; "
                      "Table 1's ablations, trained small",
                      ("adm_lib.metrics",)),
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
# adm_lib. Chapter 1 starts where every diffusion model starts: with noise.
