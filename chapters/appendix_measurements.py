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
# # Appendix: measurements
#
# The chapters state what their longer runs found, with the error bars
# the findings need. This appendix keeps the records those findings rest
# on: the command, the machine, the day, how long it took, and the raw
# tables, including the runs that an improvement of the code has since
# overtaken. Nothing here trains: the figures were drawn by the commands
# shown and committed under `chapters/figures/`, and the one cell that
# computes (M.8) recomputes the error bars chapter 4 quotes from the
# tables, in a fraction of a second.
#
# All runs were made on this project's 2-core CPU machines, shared with
# other jobs, with the PyTorch 2.13 CPU build and no GPU. The machine
# changed from day to day, and what it was matters for speed and for
# `precision="auto"` (chapter 4.5), so each record names it:
#
# * **AVX2 EPYC**: an AMD EPYC with AVX2 but no native bf16, so "auto"
#   is float32;
# * **bf16 EPYC**: an AMD EPYC with AVX-512-BF16, so "auto" is bf16;
# * **AMX Xeon**: an Intel Xeon with AMX, so "auto" is bf16 too.
#
# No GPU had been lent to the project when these were made; the chapters
# give the commands of their GPU runs, whose tables belong here. The
# figure after the list places each record by its day and machine.
#
# * M.1 chapter 2's longer run;
# * M.2 bf16 against float32 (chapter 4.5);
# * M.3 chapter 4's longer run (chapter 4.8);
# * M.4 the architecture ablations at CPU scale (chapter 5.10);
# * M.5 the demo's recipe, the study in full (chapter 4.9);
# * M.6 the recorded runs of chapters 5, 6 and 7: machines and times;
# * M.7 speed: `adm bench` against the reference (appendix R.7);
# * M.8 the error bars of chapter 4, recomputed.

# %% tags=["parameters"]
# The records below are read, not rerun: `adm book run appendix_measurements`
# takes seconds. Each record says the command that made it.
significance: float = 2.0  # a gap of this many standard errors is real

# %%
import os
from datetime import date

import matplotlib.pyplot as plt
import numpy as np

from adm_lib.book import find_root

# Relative paths start at the book's root, as in every chapter.
os.chdir(find_root())

# %% jupyter={"source_hidden": true}
RECORDS = [  # (section, what, machine, day), as the sections below state
    ("M.1", "chapter 2, longer run", "AMX Xeon", "2026-12-07"),
    ("M.2", "bf16 / fp32, batch 4", "AVX2 EPYC", "2026-12-03"),
    ("M.2", "bf16 / fp32, batch 32", "bf16 EPYC", "2026-12-03"),
    ("M.2", "bf16 / fp32, paired test", "AVX2 EPYC", "2026-12-07"),
    ("M.3", "chapter 4, longer run", "bf16 EPYC", "2026-12-03"),
    ("M.4", "ablations, CPU scale", "AVX2 EPYC", "2026-11-25"),
    ("M.5", "demo recipes", "AVX2 EPYC", "2026-12-02"),
    ("M.5", "demo recipes, bf16", "bf16 EPYC", "2026-12-03"),
    ("M.5", "demo seeds", "AMX Xeon", "2026-12-07"),
    ("M.5", "FID floor at n = 200", "AVX2 EPYC", "2026-12-07"),
    ("M.6", "chapter 5.8", "AVX2 EPYC", "2026-11-25"),
    ("M.6", "chapter 5.9", "AVX2 EPYC", "2026-12-07"),
    ("M.6", "chapter 6.9", "AMX Xeon", "2026-12-07"),
    ("M.6", "chapter 7.7", "AVX2 EPYC", "2026-12-02"),
    ("M.6", "chapter 7.7, MNIST-5k", "AVX2 EPYC", "2026-12-07"),
    ("M.7", "adm bench, fp32", "AVX2 EPYC", "2026-12-04"),
    ("M.7", "adm bench, bf16", "bf16 EPYC", "2026-12-03"),
    ("M.7", "adm bench, AMX", "AMX Xeon", "2026-12-07"),
]
MARKERS = {"AVX2 EPYC": ("o", "tab:blue"), "bf16 EPYC": ("s", "tab:orange"),
           "AMX Xeon": ("D", "tab:green")}
first = min(date.fromisoformat(day) for *_, day in RECORDS)
fig, ax = plt.subplots(figsize=(8, 4.8))
for row, (*_, machine, day) in enumerate(reversed(RECORDS)):
    marker, colour = MARKERS[machine]
    days = (date.fromisoformat(day) - first).days
    ax.scatter(days, row, marker=marker, color=colour, s=50,
               label=machine)
ax.set_yticks(range(len(RECORDS)),
              [f"{s}  {w}" for s, w, *_ in reversed(RECORDS)], fontsize=8)
ax.set_xlabel(f"day of the run (days after {first.isoformat()})")
ax.set_title("The records: each run's day and machine")
handles, labels = ax.get_legend_handles_labels()
unique = dict(zip(labels, handles, strict=True))
ax.legend(unique.values(), unique.keys(), title="machine", loc="lower left")
ax.grid(axis="x", alpha=0.3)
fig.tight_layout()
plt.show()
assert {s for s, *_ in RECORDS} == {f"M.{n}" for n in range(1, 8)}

# %% [markdown]
# ## M.1 Chapter 2: the longer run
#
# Section 2.11's run, on the AMX Xeon, 2026-12-07, in float32 (chapter
# 2's loop has no autocast):
#
# ```sh
# adm book run 2 -p train_steps 6000 -p batch_size 64 \
#     -p num_samples 16 -p nll_images 16 -p sample_steps "[10, 25, 50, 250]"
# ```
#
# (its `sample_steps` were then the default). Its 6,000 steps of batch
# 64 trained in 1,449 s. Its table and figures are in section 2.11. The
# runs before it:
#
# * the same run before chapter 2's loop kept an EMA (2026-12-03, an AMD
#   EPYC; it evaluated its last step's weights) bounded the same 16
#   images at 1.601 bits/dim, 0.711 of it in the decoder, against 1.453
#   and 0.620 with the EMA, two runs on the same 16 images whose per-image
#   bounds were not kept: without a paired standard error the 0.15 bits/dim
#   between them is not a claim (section 2.8 now prints the paired
#   difference of every run). Its samples changed less: the last row of
#   section 2.10's figure (the last step's weights, from the same noise)
#   is the row above it with small changes of stroke;
# * the run of 2026-11-25, 2,000 steps, no EMA, gave 1.70 bits/dim and
#   samples mostly of strokes; one twice as long as section 2.11's,
#   `-p train_steps 12000`, 2,568 s on the same machine and day, gave
#   1.515 bits/dim and samples of the same kind: no better.

# %% [markdown]
# ## M.2 bf16 against float32
#
# `scripts/precision_curves.py` trains the demo's diffusion model
# (chapter 4.9) twice from the same seed, so that both runs see the same
# batches, timesteps and noise, once in float32 and once under bf16
# autocast, and logs every step's loss. For each window of 100 steps it
# compares the two runs' mean losses with the noise of such a mean: the
# standard error of the difference of two means of 100 steps, from the
# spread of the loss within the window. On the AVX2 EPYC, which has no
# native bf16, oneDNN emulates it: the same roundings, six times slower
# than float32 there (0.83 against 0.14 s a step), which is why the batch
# is 4 rather than the demo's 32. On 2026-12-03:
#
# ```sh
# python scripts/precision_curves.py --steps 1000 --batch 4 \
#     --out build/precision --plot chapters/figures/04_bf16_fp32.png
# ```
#
# ![float32 and bf16 autocast over the same 1,000 steps: the losses, and
# their gap in standard errors](figures/04_bf16_fp32.png)
#
# | steps | fp32 | bf16 | gap | standard error | gap / se |
# | --- | --- | --- | --- | --- | --- |
# | 1-100 | 0.1602 | 0.1600 | -0.0002 | 0.0231 | -0.01 |
# | 101-200 | 0.0876 | 0.0881 | +0.0005 | 0.0054 | +0.10 |
# | 201-300 | 0.0855 | 0.0852 | -0.0002 | 0.0050 | -0.05 |
# | 301-400 | 0.0732 | 0.0727 | -0.0004 | 0.0050 | -0.09 |
# | 401-500 | 0.0714 | 0.0708 | -0.0006 | 0.0046 | -0.13 |
# | 501-600 | 0.0756 | 0.0753 | -0.0003 | 0.0053 | -0.05 |
# | 601-700 | 0.0652 | 0.0657 | +0.0004 | 0.0044 | +0.09 |
# | 701-800 | 0.0686 | 0.0688 | +0.0001 | 0.0054 | +0.03 |
# | 801-900 | 0.0718 | 0.0720 | +0.0001 | 0.0048 | +0.03 |
# | 901-1000 | 0.0697 | 0.0697 | -0.0000 | 0.0050 | -0.00 |
#
# Every window's gap is under 0.13 of the standard error of two
# independent windows, and under 1% of the loss. The runs share their
# batches, so their window means are correlated and that standard error
# overstates the noise of the gap: the test is a loose one (a paired
# one, from the spread of the per-step differences, would be tighter),
# but after 1,000 steps the rounding has not pushed the bf16 run onto
# another path. These tables predate the paired test, recorded below
# (400 steps), where the rounding shows (one window 3.1 paired standard
# errors off) but stays under 0.7% of the loss, in both directions. On a
# GPU, `scripts/gpu_check.sh` runs the same comparison at the demo's
# batch of 32 (`--device cuda` is picked by itself).
#
# The same comparison at the demo's batch of 32, on the bf16 EPYC,
# 2026-12-03, both runs in 359 s:
#
# ```sh
# python scripts/precision_curves.py --steps 1000 --batch 32 \
#     --out build/precision_native \
#     --plot chapters/figures/04_bf16_fp32_native.png
# ```
#
# ![The same at batch 32 with native bf16](figures/04_bf16_fp32_native.png)
#
# | steps | fp32 | bf16 | gap / se |
# | --- | --- | --- | --- |
# | 1-100 | 0.1422 | 0.1423 | +0.00 |
# | 101-200 | 0.0707 | 0.0705 | -0.14 |
# | 201-300 | 0.0658 | 0.0661 | +0.15 |
# | 301-400 | 0.0615 | 0.0615 | +0.01 |
# | 401-500 | 0.0567 | 0.0567 | +0.02 |
# | 501-600 | 0.0577 | 0.0578 | +0.07 |
# | 601-700 | 0.0567 | 0.0568 | +0.08 |
# | 701-800 | 0.0564 | 0.0564 | -0.00 |
# | 801-900 | 0.0542 | 0.0542 | -0.00 |
# | 901-1000 | 0.0537 | 0.0537 | +0.03 |
#
# Every gap is under 0.15 of those standard errors, and under 0.6% of
# the loss: with native bf16, too, the two runs learn the same.
#
# The paired test that chapter 4.5 quotes: the same two runs' per-step
# losses are paired (same batches, timesteps and noise), so the gap's
# standard error is that of the mean per-step difference, from which the
# batch-to-batch spread cancels; the unpaired one, counting that spread,
# is 20 to 140 times larger. At batch 4, bf16 emulated, on the AVX2 EPYC
# (2-core AMD EPYC CPU, no GPU), 2026-12-07, one seed:
#
# ```sh
# python scripts/precision_curves.py --steps 400 --batch 4
# ```
#
# | steps | float32 | bf16 | gap $\pm$ paired s.e. | unpaired s.e. |
# | --- | --- | --- | --- | --- |
# | 1-100 | 0.1602 | 0.1600 | $-0.00022 \pm 0.00017$ | 0.0231 |
# | 101-200 | 0.0876 | 0.0881 | $+0.00051 \pm 0.00016$ | 0.0054 |
# | 201-300 | 0.0855 | 0.0850 | $-0.00046 \pm 0.00024$ | 0.0050 |
# | 301-400 | 0.0731 | 0.0726 | $-0.00051 \pm 0.00026$ | 0.0050 |
#
# The paired test sees the rounding (steps 101 to 200: 3.1 standard
# errors), but every gap is under 0.7% of the loss and the signs differ.

# %% [markdown]
# ## M.3 Chapter 4: the longer run
#
# Chapter 4's three models (sections 4.1 and 4.8) trained longer, on the
# bf16 EPYC (so bf16 autocast), 2026-12-03, with the parameters cell's
# `settings` (chapter 4.9's recipe for the diffusion model and the
# upsampler):
#
# ```sh
# adm book run 4 -p train_steps 1500 -p classifier_steps 1000 \
#     -p batch_size 32 -p snapshot_every 250 -p figures_dir chapters/figures \
#     -p runs_dir build/chapter4_record
# ```
#
# (The classifier was then evaluated on all 500 held-out images; the
# chapter's `eval_images` parameter, 64 in its smoke configuration, now
# says how many, so `-p eval_images 500` repeats this run.)
#
# | | diffusion | classifier | upsampler 8 to 32 |
# | --- | --- | --- | --- |
# | parameters | 1.37M | 0.79M | 1.37M |
# | steps of batch 32 | 1,500 | 1,000 | 1,500 |
# | images/s | 125 | 235 | 149 |
# | loss, step 50 / last | 0.203 / 0.050 | 2.30 / 0.57 | 0.176 / 0.0125 |
# | of which q0 / q3 | 0.0049 / 0.133 | | 0.0034 / 0.022 |
# | held-out top-1 / top-5 | | 77.2% / 95.2% | |
# | the same, EMA | | 77.4% / 94.8% | |
#
# (The losses are logged means over 50-step windows, $L_\text{simple}$ in
# $x_0$ for the two diffusion models; the classifier's accuracy is on 500
# held-out images at random $t$; images per second are the medians of the
# logged windows.) The three runs took 844 s in all. The curves:
#
# ![Loss curves of the CPU run](figures/04_cpu_run_curves.png)
#
# and the EMA's samples every 250 steps (DDIM, 10 steps, the same noise
# and labels each time), then the upsampler's last grid:
#
# ![Samples of the CPU run](figures/04_cpu_run_samples.png)
#
# The backgrounds are black from the first grid on, and most classes
# are recognisable by step 750: 0, 1, 4, 6, 7, 8 and 9, while this noise
# still gives an unclear 2, 3 and 5 at step 1,500. In $x_0$ the noisiest
# quartile is the hard one (0.133 against 0.0049 for the least noisy),
# and it falls little after step 500: at $t$ near $T$ the best
# prediction is a blurred mean of digits, which the sampler's later,
# less noisy steps sharpen. The upsampler, which sees its 8-pixel input,
# has a sixth of that loss at q3 and follows its inputs closely. The
# classifier is right three times in four on images at uniformly random
# noise levels, most of them heavily noised. The same command with
# `-p settings "{}"` gives the preset's recipe ($\epsilon$, learned
# variances), whose grids at the same steps (recorded here on 2026-11-25)
# were grey and grainy, with a few classes still noise at step 1,500.
#
# The full run, on one GPU, is
#
# ```sh
# adm book run 4 -p device cuda -p train_steps 20000 \
#     -p classifier_steps 10000 -p batch_size 128 -p num_channels 64 \
#     -p snapshot_every 2000
# ```
#
# and has not been made yet: its numbers belong in this table.

# %% [markdown]
# ## M.4 The architecture ablations at CPU scale
#
# Chapter 5.10 trains chapter 3's ablations with chapter 4's loop. The one
# run recorded at CPU scale was made with an earlier version of the book,
# whose chapter 3 trained the variants with a hand-written loop of its
# own (AdamW with PyTorch's default weight decay of 0.01, raw rather than
# EMA weights, one timed loop that copied the weights at each arm) and
# measured $L_\text{simple}$ from the raw network output: the protocol of
# chapter 5.10, but not its loop, so its numbers are not that section's.
# It ran on the AVX2 EPYC on 2026-11-25, on a 5,000-image subset of
# CIFAR-10; training and evaluating the nine variants took 13.9 minutes.
# The command that records it with chapter 4's loop, which has not been
# run yet:
#
# ```sh
# adm book run 5 -p ablation_data ../shared/data/cifar10/train.zip \
#     -p ablation_train_images 5000 -p ablation_eval_images 128 \
#     -p ablation_batch_size 16 -p ablation_steps 100 \
#     -p ablation_seconds 60 -p ablation_timing_steps 20 \
#     -p ablation_samples 4 -p ablation_sample_steps ddim25
# ```
#
# Its tables, as printed but for two columns dropped to fit the page (the
# parameter counts, listed in 3.11, and the VLB's unpaired standard errors,
# 1.03 to 1.20 bits/dim, which are dominated by the spread between images).
# The VLB is estimated on 128 held-out (image, t) pairs; the last column is
# the paired difference from the baseline with its standard error, negative
# is better:
#
# ```text
# equal steps:
# variant                      steps ms/step L_simple    VLB    vs baseline
# baseline                       100   561.9   0.0992  4.437  +0.000 ±0.000
# depth (4 blocks, 0.8x width)   100   855.1   0.1011  4.414  -0.024 ±0.042
# 4 heads                        100   579.2   0.1004  4.506  +0.069 ±0.030
# 64 channels per head           100   564.4   0.0993  4.430  -0.008 ±0.013
# attention at 32, 16, 8         100  1417.2   0.0999  4.477  +0.040 ±0.030
# BigGAN up/down                 100   609.6   0.1021  4.524  +0.087 ±0.034
# residual rescaling             100   544.7   0.1014  4.544  +0.106 ±0.038
# AdaGN                          100   555.4   0.0993  4.503  +0.065 ±0.028
# ADM                            100  1478.9   0.0968  4.437  -0.000 ±0.011
#
# equal time:
# variant                      steps ms/step L_simple    VLB    vs baseline
# baseline                       107   562.3   0.0938  4.226  +0.000 ±0.000
# depth (4 blocks, 0.8x width)    71   848.6   0.1172  4.486  +0.260 ±0.054
# 4 heads                        104   579.3   0.0974  4.345  +0.119 ±0.043
# 64 channels per head           107   564.0   0.0945  4.239  +0.013 ±0.015
# attention at 32, 16, 8          42  1430.4   0.2148  5.170  +0.944 ±0.178
# BigGAN up/down                  99   609.9   0.1015  4.460  +0.234 ±0.095
# residual rescaling             110   546.8   0.0973  4.429  +0.203 ±0.090
# AdaGN                          109   553.9   0.0936  4.313  +0.087 ±0.039
# ADM                             41  1482.3   0.2164  5.121  +0.895 ±0.168
# ```
#
# What it shows, honestly: after 100 steps of batch 16 every model is at
# the very start of training (its DDIM samples are still noise), and the
# differences at equal steps are a few hundredths of a bit, within two or
# three paired standard errors. On this evidence nothing of the paper's
# findings is confirmed or refuted. The paper found that attention at 32,
# 16 and 8, 64 channels per head, BigGAN up/down-sampling and AdaGN each
# improve FID, and that residual rescaling does not; here residual
# rescaling is indeed not better than the baseline, and 64 channels per
# head ties it, but BigGAN resampling, AdaGN and more attention are
# slightly *worse* this early. The equal-time arm shows the other half of
# the paper's argument on a CPU: attention at $32 \times 32$ costs 2.5
# times the baseline's time per step here, so within the same minute the
# variants that use it (and ADM) reach far fewer steps and fall behind,
# while depth pays for its 63% more parameters in the same way. On a GPU
# the relative costs differ; the GPU run will show by how much.
#
# The full run, on one GPU, is
#
# ```sh
# adm book run 5 -p device cuda \
#     -p ablation_data ../shared/data/cifar10/train.zip \
#     -p ablation_batch_size 128 -p ablation_steps 3000 \
#     -p ablation_seconds 120 -p ablation_timing_steps 50 \
#     -p ablation_eval_images 1000 -p ablation_samples 8 \
#     -p ablation_sample_steps ddim25
# ```
#
# It has not been made yet either, and its table belongs here.

# %% [markdown]
# ## M.5 The demo's recipe: the study
#
# Chapter 4.9 states what this study found. In full, in the order it
# was made, as it was written at the time: where it reads more into a gap
# than the gap's standard error allows, chapter 4.9 and M.8 give the gap
# with its error.
#
# The paper's recipe (predict $\epsilon$, learn the variances with
# $L_\text{hybrid}$, an EMA at 0.9999) is made for hundreds of thousands
# of steps. `adm demo` has a few hundred on a CPU, and with that recipe
# its digits sat on grey backgrounds and were mostly not of the class
# asked for. So the recipes were measured as the demo uses them: the
# MNIST preset's network with one residual block per level (1.37M
# parameters) on MNIST-5k, batch 32, learning rate
# $10^{-3}$, seed 0, each recipe changing only the fields in the table;
# every checkpoint sampled 20 times per digit with 25 DDIM steps, without
# guidance, and scored with chapter 5's MNIST network (accuracy, FID in
# its features against the 5,000 training digits, and the mean pixel,
# 25.6 of 255 for the data). On the AVX2 EPYC (float32), 2026-12-02:
#
# ```sh
# python scripts/demo_recipes.py eps x0 --images 12800 --out build/recipes
# python scripts/demo_recipes.py x0-simple x0-simple-lr2e-3 \
#     --out build/recipes
# python scripts/demo_recipes.py x0-simple --scale 1 --out build/recipes
# python scripts/demo_recipes.py x0-simple --scale 1 --sampler ddpm \
#     --last --out build/recipes
# python scripts/demo_recipes.py --out build/recipes \
#     --plot chapters/figures/04_demo_recipes.png
# ```
#
# (The first two recipes ran for 400 steps only, to save time: they
# were far behind by then.)
#
# The recipes: *eps* is the paper's ($\epsilon$, learned variances);
# *x0* predicts $x_0$ instead; *x0-simple* also fixes the variances, so
# that the loss is $L_\text{simple}$ alone; *x0-simple-lr2e-3* doubles
# its learning rate. Raw weights unless an EMA is named:
#
# | recipe | steps | accuracy | FID | mean pixel |
# | --- | --- | --- | --- | --- |
# | eps | 400 | 16.0% | 96.1 | 99.2 |
# | x0 | 400 | 15.0% | 16.5 | 28.4 |
# | x0-simple | 400 | 76.5% | 3.2 | 24.6 |
# | x0-simple | 800 | 87.0% | 2.2 | 23.2 |
# | x0-simple, EMA 0.95 | 800 | 91.5% | 1.4 | 26.5 |
# | x0-simple, EMA 0.999 | 800 | 89.5% | 1.4 | 26.1 |
# | x0-simple-lr2e-3 | 800 | 82.0% | 2.7 | 23.2 |
# | x0-simple-lr2e-3, EMA 0.95 | 800 | 88.5% | 1.7 | 26.6 |
#
# ![The recipes against training minutes](figures/04_demo_recipes.png)
#
# With 200 samples an accuracy is known to about 3 points (one standard
# error). Three things matter, in this order:
#
# * **The target.** Predicting $\epsilon$, the network's error in $x_0$
#   is its error in $\epsilon$ times
#   $\sqrt{1 - \bar\alpha_t} / \sqrt{\bar\alpha_t}$, which is huge at the
#   noisiest steps, where a sample's overall brightness is decided: the
#   grey backgrounds (a mean pixel of 99) are that error, left in place.
#   Predicting $x_0$ puts the error where it shows, and the backgrounds go
#   black by step 400.
# * **The variance term.** With learned variances the loss is
#   $L_\text{simple} + \lambda L_\text{vlb}$, and early on the second
#   term is the larger: in the x0 run's log at step 400, `mse` is 0.080
#   and `vb` 0.095, 0.36 in the least noisy quarter of $t$. Its gradient
#   reaches the mean only through the shared network (the mean is
#   detached in it), yet the same network fitted $L_\text{simple}$
#   worse with it: 0.080 at step 400 against 0.058 without it. Dropping
#   it (fixed variances) took the accuracy at step 400 from 15% to 76.5%:
#   the class is learned within minutes. What $L_\text{vlb}$ buys, a
#   likelihood (chapter 2), the demo does not need, and its 25 ancestral
#   steps do well with fixed variances (below).
# * **A short EMA.** The weights still move fast. Chapter 4.6's warm-up
#   holds every rate to $\frac{1+n}{10+n}$, 0.989 at step 800, so 0.999
#   averages about the last ninety steps and 0.95 the last twenty; at
#   step 800 they gained 2.5 and 4.5 points over the raw weights, which
#   with 200 samples is within two standard errors of each other.
#
# The guided samples need one more choice. Chapter 6's two forms of
# guidance differ here. DDIM's (Algorithm 2) turns the classifier's
# gradient $g$ into a change of $x_0$ of
# $(1 - \bar\alpha_t) g / \sqrt{\bar\alpha_t}$; at the first of 25
# steps of the cosine schedule $\bar\alpha = 2.4 \times 10^{-9}$, and
# the next $x$ moves by 1,326 $g$ (chapter 6.1 derives it). Ancestral
# guidance (Algorithm 1) shifts the mean by $s \Sigma g$, bounded by the
# step's variance. At scale 1, with a noisy classifier of 400 steps (the
# preset's, two residual blocks per level), the x0-simple model at step
# 800 with EMA 0.95 gave:
#
# | sampler, 25 steps | accuracy | FID | mean pixel |
# | --- | --- | --- | --- |
# | DDIM, unguided | 91.5% | 1.4 | 26.5 |
# | DDIM, guided | 48.5% | 10.8 | 38.1 |
# | ancestral, guided | 95.0% | 1.0 | 26.4 |
#
# (and with EMA 0.999, 96.5%, 0.85 and 25.9 ancestrally). The reference
# does the same arithmetic, which the parity tests compare, so this is
# the method, not a bug: with the cosine schedule and few steps, guide
# ancestrally. The demo trains x0-simple with EMA 0.95 and samples
# ancestrally.
#
# The last choice is the budget. The demo trains both networks and runs
# two guided sampling passes (200 digits at each of scales 1 and 4), and
# it should take five minutes on a 2-core CPU. First the classifier,
# each guiding the model at step 400 (EMA 0.95, ancestrally at scale 1,
# 200 samples):
#
# | classifier | seconds | accuracy | FID |
# | --- | --- | --- | --- |
# | two blocks a level, 100 steps | 43 | 77.5% | 1.99 |
# | two blocks a level, 200 steps | 81 | 82.5% | 1.87 |
# | the same, lr $10^{-3}$ | 86 | 81.0% | 1.93 |
# | the same, lr $3 \times 10^{-3}$ | 87 | 83.0% | 1.90 |
# | two blocks a level, 400 steps | 168 | 87.5% | 1.81 |
# | one block a level, 400 steps | 111 | 87.5% | 1.78 |
#
# (lr $3 \times 10^{-4}$ unless given, annealed to 0; batch 64; seconds of
# training on this CPU, 2026-12-03. Each is the demo's classifier of that
# day with `adm train classifier --out RUN --set batch_size=64 --set
# classifier_depth=D --set steps=N --set lr_anneal_steps=N`, guiding
# the x0-simple run's step-400 checkpoint as the demo does.) The
# classifier's steps matter and its learning rate does not (the three
# are within a standard error of each other); half its blocks cost
# nothing in accuracy and save a third of its time, so the demo's has one
# per level.
#
# Then the network's cost. Both of the demo's networks spend three
# quarters of a step in convolutions (PyTorch's profiler), and the
# costliest are at 32x32. The preset resamples with residual blocks
# (`resblock_updown`, the paper's BigGAN blocks), each two convolutions
# at the larger of its two sizes, and has 64 channels at 16x16. The
# demo's *lean* network (`adm_lib.demo.LEAN`) resamples with one
# convolution and keeps 32 channels at 16x16 (`channel_mult` 1,1,2).
# Side by side in one process, alternating rounds, on random batches:
#
# ```sh
# python scripts/demo_step_times.py --rounds 6
# ```
#
# | model | network | parameters | batch | s/step | lean / preset |
# | --- | --- | --- | --- | --- | --- |
# | diffusion | preset | 1.37M | 32 | 0.725 | 1.00 |
# | diffusion | lean | 0.88M | 32 | 0.437 | 0.60 |
# | classifier | preset | 0.56M | 32 | 0.187 | 1.00 |
# | classifier | lean | 0.40M | 32 | 0.131 | 0.70 |
#
# (Medians of 6 rounds on this CPU, 2026-12-03; both classifiers have
# one block a level.)
#
# Per step the lean diffusion model learns as fast as the preset's, so
# it gets there in less time. The x0-simple recipe with each network,
# every checkpoint guided at scale 1 by the same classifier (the 400-step
# one-block one above, with the preset's resampling and batch 64: the
# demo's of that day, which the script trained then; it now trains the
# demo's current one), 25 ancestral steps, EMA 0.95, 200 samples:
#
# ```sh
# python scripts/demo_recipes.py x0-simple-lean --scale 1 --sampler ddpm \
#     --weights 0.95 --out build/recipes_demo
# python scripts/demo_recipes.py --out build/recipes_demo --scale 1 \
#     --sampler ddpm --weights 0.95 --plot chapters/figures/04_demo_lean.png
# ```
#
# ![The preset's network and the lean one against training
# minutes](figures/04_demo_lean.png)
#
# | steps | preset: accuracy | FID | lean: accuracy | FID | mean pixel |
# | --- | --- | --- | --- | --- | --- |
# | 200 | 77.0% | 3.51 | 77.5% | 3.15 | 26.4 |
# | 400 | 87.5% | 1.78 | 91.0% | 1.54 | 25.4 |
# | 600 | 93.0% | 0.91 | 94.0% | 1.03 | 25.1 |
# | 800 | 96.5% | 0.91 | 97.5% | 0.90 | 25.7 |
#
# (Mean pixel of the lean run's samples; the data's is 25.6. Minutes in
# the figure are each run's own pace, 0.64 and 0.42 s a step, measured
# on different days; the table above is the fair comparison of speed.)
# The lean network is ahead at all four checkpoints, by 0.5 to 3.5 points, each
# within about one standard error of the difference (3.1 to 4.2 points with 200
# samples a side): as accurate per step, in 0.6 of the time, so the demo uses
# it for both networks. With it the demo's other costs were measured on the
# demo itself (`adm demo`, which reuses finished runs, so each change below
# retrains only what it changes). The classifier's batch, each lean and 400
# steps, guiding the same 400-step lean model, 25 ancestral steps:
#
# | classifier batch | seconds | accuracy | FID |
# | --- | --- | --- | --- |
# | 64 | 124 | 89.0% | 1.52 |
# | 32 | 55 | 87.0% | 1.60 |
#
# (`adm demo --out D --classifier-batch B --respacing 25`.) Two points,
# within a standard error, for 69 seconds: the diffusion model's steps
# buy more accuracy per second (the lean curve above gains 13.5 points
# from 200 to 400 steps, 87 seconds at the lean pace), so the demo's
# classifier trains at batch 32. Then the sampler's steps: the curve's
# run below, its checkpoints guided at scale 1 by that classifier, three
# sampling seeds of 200 digits each (the command of the curve, then the
# same with `--respacing 10` and `--respacing 25`, which reuse the run),
# and the seconds of the demo's two guided passes (`adm demo --respacing
# R`, reusing the runs):
#
# | respacing | seconds | accuracy at 400 (seeds) | FID | at 600 | FID |
# | --- | --- | --- | --- | --- | --- |
# | 10 | 24 | 90.0% (92.0, 88.0, 90.0) | 1.95 | 93.5% | 1.19 |
# | 15 | 40 | 90.0% (90.0, 88.0, 92.0) | 1.72 | 95.5% | 1.03 |
# | 25 | 68 | 88.5% (87.0, 88.0, 90.5) | 1.71 | 95.5% | 1.04 |
#
# The number of steps hardly matters to these samples: from 10 to 25 the
# accuracies are within a standard error of each other (one is about 1.2
# points for 600 samples). FID starts to rise at 10, from 1.72 to 1.95,
# a fifth of the 10 the demo allows itself, so the demo samples with 10
# steps, in 40% less time than 15. Last, the learning-rate
# schedule: decaying it linearly to 0 over the 400 steps, a common choice
# for short runs, lost accuracy from either starting rate (same
# classifier, 15 steps, three seeds):
#
# ```sh
# python scripts/demo_recipes.py lean-decay lean-decay-lr2e-3 \
#     --images 12800 --every 12800 --scale 1 --sampler ddpm \
#     --weights 0.95 --respacing 15 --seeds 3 --out build/recipes_decay
# ```
#
# | learning rate, 400 steps | accuracy (seeds) | FID |
# | --- | --- | --- |
# | $10^{-3}$, constant (the demo's) | 90.0% (90.0, 88.0, 92.0) | 1.72 |
# | $10^{-3}$, decayed to 0 | 87.3% (85.0, 87.5, 89.5) | 1.95 |
# | $2 \times 10^{-3}$, decayed to 0 | 80.3% (78.5, 79.5, 83.0) | 2.97 |
#
# (These three used 15 sampling steps, the demo's choice of that hour.)
# So the demo's recipe: the lean x0-simple model, batch 32 at a constant
# $10^{-3}$; the lean classifier, 400 steps of batch 32; 10 ancestral
# steps. The diffusion model's number of steps is the budget's (below).
# Its curve of accuracy against training minutes, guided with 15 steps:
#
# ```sh
# python scripts/demo_recipes.py x0-simple-lean --scale 1 --sampler ddpm \
#     --weights 0.95 --respacing 15 --seeds 3 --out build/recipes_final \
#     --plot chapters/figures/04_demo_curve.png
# ```
#
# ![Accuracy and FID of the demo's samples against training
# minutes](figures/04_demo_curve.png)
#
# | steps | minutes | accuracy (seeds) | FID | mean pixel |
# | --- | --- | --- | --- | --- |
# | 200 | 1.8 | 70.0% (66.0, 72.5, 71.5) | 3.86 | 26.2 |
# | 400 | 3.6 | 90.0% (90.0, 88.0, 92.0) | 1.72 | 25.7 |
# | 600 | 5.3 | 95.5% (93.5, 96.5, 96.5) | 1.03 | 25.6 |
# | 800 | 7.1 | 96.2% (95.0, 96.0, 97.5) | 0.96 | 25.5 |
#
# (Minutes at that run's pace, 0.53 s a step; FID the mean of the seeds'.
# The data's mean pixel is 25.6.) The same run again, with a checkpoint
# every 50 steps up to the demo's 400, guided with the demo's 10 steps,
# three seeds of 200 digits each:
#
# ```sh
# python scripts/demo_recipes.py x0-simple-lean --images 12800 \
#     --every 1600 --scale 1 --sampler ddpm --weights 0.95 \
#     --respacing 10 --seeds 3 --out build/recipes_fine
# ```
#
# | steps | minutes | accuracy (seeds) | FID | mean pixel |
# | --- | --- | --- | --- | --- |
# | 50 | 0.5 | 29.7% (25.5, 31.5, 32.0) | 14.02 | 30.3 |
# | 100 | 1.0 | 52.8% (50.5, 56.5, 51.5) | 6.83 | 27.6 |
# | 150 | 1.5 | 64.5% (61.5, 68.5, 63.5) | 5.06 | 27.4 |
# | 200 | 2.0 | 71.3% (69.0, 72.5, 72.5) | 4.02 | 26.5 |
# | 250 | 2.5 | 76.8% (75.5, 77.0, 78.0) | 3.30 | 26.5 |
# | 300 | 2.9 | 81.7% (84.0, 78.0, 83.0) | 2.76 | 26.2 |
# | 350 | 3.4 | 87.3% (91.5, 85.0, 85.5) | 2.15 | 26.1 |
# | 400 | 3.9 | 90.0% (92.0, 88.0, 90.0) | 1.95 | 25.9 |
#
# (Minutes at this run's pace, 0.59 s a step, 2026-12-03 afternoon.)
# Its 400-step row is the 10-step row of the respacing table to the
# digit: checkpoints every 50 steps do not change the run. The accuracy
# crosses 85% between 300 and 350 steps and reaches 90% at 400.
#
# The demo's budget is five minutes on a 2-core CPU. On the CPU of the
# measurements above (AVX2 without native bf16, so float32) its pace
# drifted: a diffusion step took 0.44 s in the side-by-side timing and
# 0.47 to 0.70 s over 25-step intervals in the afternoon's runs. Besides
# training the diffusion model the demo spent 90 to 115 s there (the
# classifier 55 to 70, the two guided passes 25 to 40, the scoring 8 to
# 9); 400 steps from a fresh clone took 330 s, so five minutes held 350
# steps, the first checkpoint past 85%: 311 s from a fresh clone, 91.5%
# at scale 1. That is the demo's default on such a CPU (below).
#
# A CPU with native bf16 (AVX-512-BF16 or AMX) trains and samples under
# bf16 autocast by itself (`precision="auto"`, chapter 4.5), and M.2's
# loss curves show that it learns what float32 learns. On such a
# CPU, the bf16 EPYC, 2026-12-03, the curve again,
# now past 400 steps, sampled at the demo's precision too:
#
# ```sh
# python scripts/demo_recipes.py x0-simple-lean --images 19200 \
#     --every 1600 --scale 1 --sampler ddpm --weights 0.95 \
#     --respacing 10 --seeds 3 --out build/recipes_bf16
# python scripts/demo_recipes.py --out build/recipes_bf16 --scale 1 \
#     --sampler ddpm --weights 0.95 --respacing 10 \
#     --plot chapters/figures/04_demo_curve_bf16.png
# ```
#
# ![The demo's curve in bf16](figures/04_demo_curve_bf16.png)
#
# | steps | minutes | accuracy (seeds) | FID | mean pixel |
# | --- | --- | --- | --- | --- |
# | 100 | 0.3 | 55.2% (53.0, 59.5, 53.0) | 6.60 | 27.7 |
# | 200 | 0.6 | 71.3% (69.0, 74.5, 70.5) | 4.01 | 26.5 |
# | 300 | 0.9 | 82.3% (82.0, 80.5, 84.5) | 2.61 | 26.2 |
# | 350 | 1.0 | 86.3% (87.5, 85.5, 86.0) | 2.16 | 26.2 |
# | 400 | 1.2 | 88.0% (88.5, 86.0, 89.5) | 1.96 | 25.7 |
# | 450 | 1.3 | 90.0% (91.0, 89.0, 90.0) | 1.53 | 25.3 |
# | 500 | 1.5 | 91.7% (89.5, 92.0, 93.5) | 1.45 | 25.7 |
# | 550 | 1.6 | 91.7% (91.0, 92.5, 91.5) | 1.37 | 25.0 |
# | 600 | 1.8 | 93.5% (93.5, 94.5, 92.5) | 1.18 | 25.4 |
#
# (Minutes at this run's pace, 0.176 s a step, the median of its
# 25-step intervals: 3.2 times the float32 pace of the curve above.)
# Step for step it is the float32 curve within noise (at 350, 86.3%
# against 87.3%; at 400, 88.0% against 90.0%, each within about one
# standard error of the difference, 1.9 points with 600 samples a
# side).
#
# One training run says little about the next. On the AMX Xeon,
# 2026-12-07, the same recipe
# with four training seeds, both networks retrained for each, every
# checkpoint guided at scale 1 with three sampling seeds of 200 digits:
#
# ```sh
# for seed in 0 1 2 3; do
#     python scripts/demo_recipes.py x0-simple-lean --images 25600 \
#         --every 6400 --scale 1 --sampler ddpm --weights 0.95 \
#         --respacing 10 --seeds 3 --train-seed $seed \
#         --out build/recipes_seed$seed
# done
# ```
#
# | steps | minutes | seed 0 | seed 1 | seed 2 | seed 3 | mean | FID | pixel |
# | --- | --- | --- | --- | --- | --- | --- | --- | --- |
# | 200 | 0.7 | 72.0% | 65.2% | 68.5% | 64.8% | 67.6% | 4.38 | 26.7 |
# | 400 | 1.3 | 88.0% | 85.7% | 85.3% | 85.0% | 86.0% | 2.07 | 26.1 |
# | 600 | 2.0 | 92.7% | 93.5% | 91.8% | 93.7% | 92.9% | 1.23 | 25.6 |
# | 800 | 2.6 | 94.8% | 95.3% | 94.0% | 96.0% | 95.0% | 1.05 | 25.2 |
#
# (Each seed's accuracy is the mean of its three sampling seeds; FID and
# mean pixel are means over all twelve; minutes at 0.2 s a step.) Seed 0's
# row at 600 steps, 92.7%, is the AMD machine's 93.5% within a standard
# error. From 600 steps on, the four means spread by 0.8 points (standard
# deviation), no more than the 0.9 to 1.0 point that 600 samples' own noise
# gives: the training seed matters less than which 200 digits are drawn.
# That noise is what a single `adm demo` sees, about 1.8 points for its 200
# digits at scale 1, so at 600 steps one run in twenty would fall below 90%
# (normal approximation); of the twelve seed pairs the lowest was 90.5%. At
# 800 steps the mean is 95.0%, the lowest pair 91.5%, and a run below 90% is
# about three standard errors away. So on a CPU with native bf16 (and on a
# GPU) the demo trains 800 steps, under three minutes of training here. Its
# run from a fresh clone (README) took 187 s in all, with 93.5% at scale 1,
# FID 1.05 and a mean pixel of 25.0 (the data's 25.6).
#
# In bf16 the lean networks keep most of their lead. Side by side on the
# AMX machine, as in the float32 table above (`python
# scripts/demo_step_times.py --rounds 30`, 2026-12-07):
#
# | model | network | s/step | lean / preset |
# | --- | --- | --- | --- |
# | diffusion | preset | 0.272 | 1.00 |
# | diffusion | lean | 0.178 | 0.65 |
# | classifier | preset | 0.084 | 1.00 |
# | classifier | lean | 0.062 | 0.73 |
#
# A CPU without native bf16 trains in float32: three times slower a step
# on the AVX2 EPYC above, where 800 steps would take past seven minutes.
# There the demo's default is 350 steps (`adm_lib.demo.default_steps`),
# the first checkpoint of the float32 curve past 85%, near five minutes.
#
# FID at $n = 200$ is read with its floor: 200 real digits against the
# 5,000 score 0.72, with a standard deviation of 0.27 over ten disjoint
# sets of 200 (and 1.40 $\pm$ 0.50 against another 200), in the same
# network's features (`python scripts/fid_floor.py --n 200 --sets 10`;
# 2-core AMD EPYC CPU, no GPU, 2026-12-07). The study's FIDs carry no
# error bars, so chapter 4.9 rests no conclusion on them; the demo's last
# ones, 1.3 to 1.5, are within about three such deviations of real data.

# %% [markdown]
# ## M.6 Chapters 5, 6 and 7: machines and times
#
# The recorded runs of chapters 5 to 7 state their commands and results
# in the chapters. Where and how long they ran:
#
# * **Chapter 5.8**, the larger run of the metrics: the AVX2 EPYC,
#   2026-11-25, about 15 minutes.
# * **Chapter 5.9**, learned against fixed variances with few steps, with
#   the demo's recipe: the AVX2 EPYC, 2026-12-07, shared with other jobs
#   (up to eight). The learned-variance model was trained by an earlier
#   run of the same settings (977 s); the recorded run loaded it, trained
#   the fixed-variance one and drew 3 seeds of 150 samples per arm and
#   step count, 12.7 minutes in all. The run of 2026-12-02 it replaces
#   compared models of 300 steps whose samples were not digits.
# * **Chapter 6.9**, guidance: the AMX Xeon (bf16 autocast), 2026-12-07,
#   14 minutes in all: 203 s and 204 s for the two diffusion models' 800
#   steps, 57 s for the classifier's 400, then 184 s to sample the 18
#   classifier-guided settings and seeds of 80 samples, and 114 s for
#   classifier-free guidance, whose every step runs the network on a
#   doubled batch. The run recorded before it, on 2026-12-03, trained 400
#   steps in float32 on the AVX2 EPYC; its conditional model put 70.4% of
#   its unguided samples in the class asked for (the later run: 88.3%),
#   its grids had more malformed digits, and its gap between the gradient
#   at $x_t$ and at the mean was $-12.9 \pm 3.3$ points.
# * **Chapter 7.7**, the cascades. MNIST-5k, under the held-out
#   protocol: the AVX2 EPYC (float32), 2026-12-07, 40 minutes in all, the
#   first 20 shared with the test suite's runs; the models took 20.2,
#   2.1, 0.6, 3.8 and 3.8 minutes (`base32`, `base16`, `classifier16`,
#   `up`, `up_aug`), drawing and scoring 7.9 more. CIFAR-10 (and the
#   MNIST-5k table before it), under the earlier protocol: the AVX2 EPYC
#   (float32), 2026-12-02 and 03; the earlier MNIST-5k models took 9.5,
#   1.5, 0.5, 3.2 and 3.5 minutes and drawing and scoring 5.4 more, 25
#   minutes in all, on a free CPU. The CIFAR-10 run shared the CPU with
#   other jobs and its training cell passed the book's 30-minute cell
#   limit before `up_aug` was done; it was then run again with `-p
#   reuse_runs True`, which loads the finished runs (`up_aug` trained
#   anew in 3.0 minutes) and draws the same seeded samples. Its figures
#   are from that second run.

# %% [markdown]
# ## M.7 Speed: `adm bench` against the reference
#
# Appendix R.7 explains what `adm bench` measures: chapter 4's
# `train_step` and chapter 6's sampler, side by side with the
# reference's, alternating round by round; a ratio is the median of the
# rounds' paired ratios (not the ratio of the columns' rates), and the
# range shows how far single rounds strayed. The rates are another
# statistic: each side's work over its own median round's seconds. In
# the table, (a) and (b) are those rates, and the paired ratio is the
# median of the five rounds' ratios, with their range.
#
# On the AVX2 EPYC ("auto" is float32 on both sides), 2026-12-04, with
# nothing else running, for the 11.1M-parameter 32x32 model `cifar32` at
# the defaults (batch 32, 25 sampling steps, 2 warm-up rounds, 5 timed):
#
# ```sh
# adm bench cifar32 --reference reference
# ```
#
# | workload | adm_lib (a) | reference (b) | paired ratio (range) |
# | --- | --- | --- | --- |
# | training, images/s | 6.6 | 5.7 | 0.98x (0.96 to 1.29) |
# | sampling, images x NFE/s | 21.2 | 18.8 | 0.97x (0.84 to 1.27) |
#
# The two statistics disagree here: the ratio of the median rates is 6.6 / 5.7
# = 1.16 for training and 21.2 / 18.8 = 1.13 for sampling, against medians of
# the paired ratios of 0.98x and 0.97x. A round's pair shares the machine's
# state, so the paired ratio is the one that a busy machine does not skew, and
# both statistics lie within the rounds' range. Equal, within the noise of a
# shared machine (single rounds of the same work took from 34 to 47 seconds):
# in float32 both run the same oneDNN convolutions, which took 75% of our
# network's forward and backward time in PyTorch's profiler (backward 55%,
# forward 20%), and 71% of a forward pass alone. Chapter 3's up-sampling,
# attention layout and residual scale make the rest cheaper (`python
# scripts/unet_speed.py --before 19e384d`: up-sampling 2.96x faster at 16x16,
# the attention block 1.33x at 8x8), but a whole float32 forward only 1.02x
# (0.92 to 1.25). What a CPU can gain is bf16 where it is native. The same
# command on the bf16 EPYC and the AMX Xeon, our side under bf16 autocast, the
# reference's in float32:
#
# | machine, day | train, img/s | ratio | sample, img x NFE/s | ratio |
# | --- | --- | --- | --- | --- |
# | EPYC, AVX-512-BF16, 12-03 | 31.8 / 17.7 | 1.93x | 103.5 / 71.1 | 1.48x |
# | Xeon, AMX, 12-07 | 33.3 / 16.1 | 2.06x | 127.0 / 57.1 | 2.25x |
#
# (ours / the reference's; ratios are medians of 5 paired rounds). The
# second ran the code of that day, with the changes above; the code
# before them (`19e384d`) gave 1.94x and 2.08x on the AMX machine the
# same morning, so most of the gap between the two rows is the machines'.
# `precision="auto"` takes the bf16 path by itself on such a CPU; on one
# without, it says once that it runs in float32 instead.

# %% [markdown]
# ## M.8 The error bars of chapter 4, recomputed
#
# Chapter 4 quotes its conclusions with error bars; here they are
# recomputed from the tables above. An accuracy $p$ measured on $n$
# samples has the binomial standard error $\sqrt{p(1-p)/n}$, and a
# difference of two independent ones $\sqrt{e_1^2 + e_2^2}$. Arms
# sampled from the same noise are not independent, which makes this
# error, if anything, too large.

# %%
def standard_error(accuracy: float, n: int) -> float:
    """The binomial standard error of an accuracy in %, in points."""
    p = accuracy / 100
    return 100 * np.sqrt(p * (1 - p) / n)


def gap(a: float, n_a: int, b: float, n_b: int) -> tuple[float, float]:
    """b - a in points, and its standard error."""
    return b - a, np.hypot(standard_error(a, n_a), standard_error(b, n_b))


# (from, its samples, to, its samples), and what chapter 4 quotes
gaps = {
    "x0 -> x0-simple, 400 steps": ((15.0, 200, 76.5, 200), (61.5, 3.9)),
    "raw -> EMA 0.95, 800 steps": ((87.0, 200, 91.5, 200), (4.5, 3.1)),
    "raw -> EMA 0.999, 800 steps": ((87.0, 200, 89.5, 200), (2.5, 3.2)),
    "lr 1e-3 -> 2e-3, 800 steps": ((87.0, 200, 82.0, 200), (-5.0, 3.6)),
    "guided DDIM -> ancestral": ((48.5, 200, 95.0, 200), (46.5, 3.9)),
    "preset -> lean, 400 steps": ((87.5, 200, 91.0, 200), (3.5, 3.1)),
    "float32 -> bf16, 400 steps": ((90.0, 600, 88.0, 600), (-2.0, 1.8)),
}
for name, (row, quoted) in gaps.items():
    diff, se = gap(*row)
    verdict = "real" if abs(diff) > significance * se else "within error"
    print(f"{name:<28} {diff:+6.1f} ± {se:.1f} points ({diff / se:+.1f} se: "
          f"{verdict})")
    assert (round(diff, 1), round(se, 1)) == quoted, name

# %% [markdown]
# The four training seeds of the demo's recipe (M.5), each seed's
# accuracy the mean of three sampling seeds of 200 digits, against the
# noise of one `adm demo`'s 200 digits; and the loss gaps of M.2 in
# standard errors:

# %%
seeds = {600: [92.7, 93.5, 91.8, 93.7], 800: [94.8, 95.3, 94.0, 96.0]}
for steps, accuracy in seeds.items():
    print(f"{steps} steps: mean {np.mean(accuracy):.1f}%, between seeds "
          f"± {np.std(accuracy, ddof=1):.2f} points, one demo's 200 "
          f"digits ± {standard_error(np.mean(accuracy), 200):.1f}")
gap_se = {"batch 4, emulated": [-0.01, 0.10, -0.05, -0.09, -0.13, -0.05,
                                0.09, 0.03, 0.03, -0.00],
          "batch 32, native": [0.00, -0.14, 0.15, 0.01, 0.02, 0.07, 0.08,
                               -0.00, -0.00, 0.03]}
for name, values in gap_se.items():
    print(f"bf16 - fp32 loss, {name}: largest |gap| "
          f"{max(map(abs, values)):.2f} standard errors")
assert all(np.std(a, ddof=1) < 0.9 for a in seeds.values())
assert max(max(map(abs, v)) for v in gap_se.values()) <= 0.15

# %% [markdown]
# ## Exercises
#
# 1. The demo's report (README) put 93.5% of 200 samples in their class
#    at scale 1 and 97.0% at scale 4. Predict how many samples per scale
#    that 3.5-point gap would need to pass `significance` standard errors,
#    then check with `standard_error`.
# 2. M.8 treats each training seed's accuracy as one measurement. Predict
#    whether 800 steps beat 600 by more than two standard errors of the
#    difference of the seeds' means, then check.
# 3. Five paired rounds took (ours, the reference's) seconds (34, 33),
#    (36, 35), (40, 47), (47, 46), (45, 52). Predict whether the ratio of
#    the median rates equals the median of the paired ratios, then check.
#    (Made-up numbers, for the arithmetic.)

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 1.** The gap's standard error is $\sqrt{(p_1 q_1 + p_2
# q_2)/n}$, so it passes two of them when $n \ge 4 (p_1 q_1 + p_2 q_2) /
# 0.035^2 \approx 293$: about 300 samples a scale, half as many again as
# the demo draws. At 200 the gap is 1.7 standard errors.

# %% jupyter={"source_hidden": true} tags=["solution"]
p1, p2 = 93.5, 97.0
n = 200
while (p2 - p1) / np.hypot(standard_error(p1, n), standard_error(p2, n)) \
        < significance:
    n += 1
print(f"{n} samples per scale pass {significance} standard errors")
assert n == 294

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 2.** Yes: the means are 92.9% and 95.0%, a gap of 2.1
# points, and the seeds' spreads give standard errors of about 0.4 for
# each mean and 0.6 for the gap: 3.5 standard errors.

# %% jupyter={"source_hidden": true} tags=["solution"]
means = {s: np.mean(a) for s, a in seeds.items()}
errors = {s: np.std(a, ddof=1) / np.sqrt(len(a)) for s, a in seeds.items()}
lead = means[800] - means[600]
print(f"800 - 600 steps: {lead:+.2f} ± {np.hypot(*errors.values()):.2f}")
assert lead / np.hypot(*errors.values()) > 2

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 3.** No. Our median round took 40 s and the reference's 46 s,
# so the rates' ratio is 46 / 40 = 1.15; the paired ratios are 0.97,
# 0.97, 1.18, 0.98 and 1.16, with the median 0.98. The two medians come
# from different rounds, a quiet one of ours against a busy one of the
# reference's, while a pair shares the machine's state. M.7's float32 row
# is this case: 6.6 / 5.7 = 1.16 against 0.98x.

# %% jupyter={"source_hidden": true} tags=["solution"]
rounds = np.array([(34, 33), (36, 35), (40, 47), (47, 46), (45, 52)])
rate_ratio = np.median(rounds[:, 1]) / np.median(rounds[:, 0])
paired = np.median(rounds[:, 1] / rounds[:, 0])
print(f"ratio of median rates {rate_ratio:.2f}, median paired "
      f"ratio {paired:.2f}")
assert round(rate_ratio, 2) == 1.15 and round(paired, 2) == 0.98
