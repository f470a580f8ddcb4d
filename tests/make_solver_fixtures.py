"""Parity fixtures for chapter 8's solvers, made by the solvers' own code.

Runs LuChengTHU/dpm-solver (`dpm_solver_pytorch.py`: `DPM_Solver.sample`,
multistep DPM-Solver++) and NVlabs/edm (`generate.py`'s `edm_sampler`, with
`training/networks.py`'s `iDDPMPrecond`, EDM's wrapper of ADM's models) in
float64 on small random networks, and saves their inputs and outputs in
tests/data/solvers/. The references are read from an ignored folder (never
committed): export them from a checkout, for instance

    git -C dpm-solver show HEAD:dpm_solver_pytorch.py \
        > build/ref/dpm_solver_pytorch.py
    git -C edm archive HEAD generate.py training/networks.py \
        | tar -x -C build/ref/edm
    python -m tests.make_solver_fixtures build/ref tests/data/solvers

The committed fixtures were made on 2026-12-07 from dpm-solver commit
52bc3fbcd5de56d60917b826b15d2b69460fc2fa and edm commit
008a4e5316c8e3bfe61a62f874bddba254295afb.

Both run unmodified, but for three things this script does around them:
DPM-Solver's `get_time_steps` is replaced by the continuous times of a
respaced diffusion's steps, t = (i + 1) / N, so that both sides step on
one grid; EDM's `iDDPMPrecond` gets the table of the schedule under test
(its own formula is the cosine one) and a float64 forward (its forward
casts to float32); and `edm_sampler`'s latents are scaled so that its
start, latents * sigma_0, is our x_T = noise at the first step. EDM's
`generate.py` is read for `edm_sampler` alone (its other imports are a
command-line tool's), as `networks.py` for `iDDPMPrecond`.

Cases: linear and cosine schedules (T = 1000; DPM-Solver drops the
cosine's steps of log-SNR below -5.1, so the grids stay below them),
DPM-Solver++ of orders 1 and 2 at 3, 6 and 12 steps (lower_order_final
applies below 10 updates), an x_0-predicting model, Heun at 3, 6 and 10
EDM steps, each unguided, with classifier guidance (scale 2) and with
classifier-free guidance (w = 1.5).
"""

from __future__ import annotations

import ast
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGE = (1, 6, 6)  # channels, height, width of the fixtures' images
BATCH, CLASSES = 3, 4
CLASSIFIER_SCALE, CFG_SCALE = 2.0, 1.5
T = 1000


class TinyEps(nn.Module):
    """A small random class-conditional network: out = f(x, t, y)."""

    def __init__(self, channels: int = 1, width: int = 8) -> None:
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Linear(2, width)
        self.label = nn.Embedding(CLASSES + 1, width)  # + the null label
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None,
                **_: Any) -> Tensor:
        """The output at float timesteps t (0 to T - 1)."""
        angle = t.to(x.dtype)[:, None] / T * math.pi
        h = self.inp(x) + self.time(torch.cat([angle.sin(), angle.cos()],
                                              1))[..., None, None]
        if y is not None:
            h = h + self.label(y)[..., None, None]
        return self.out(torch.tanh(h))


class TinyClassifier(nn.Module):
    """A small random noisy classifier: logits of (x_t, t)."""

    def __init__(self, channels: int = 1, width: int = 8) -> None:
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Linear(1, width)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Logits at float timesteps t."""
        h = self.inp(x) + self.time(t.to(x.dtype)[:, None] / T)[..., None,
                                                                 None]
        return self.head(torch.tanh(h).mean((2, 3)))


def _load_source(path: Path, name: str, namespace: dict) -> Any:
    """Run the top-level definition `name` of `path` in `namespace`."""
    tree = ast.parse(path.read_text())
    node, = (n for n in tree.body
             if isinstance(n, ast.FunctionDef | ast.ClassDef)
             and n.name == name)
    # Decorators (EDM's persistence) are a training tool's, not the maths.
    node.decorator_list = []
    exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
    return namespace[name]


def _betas(schedule: str) -> np.ndarray:
    from adm_lib.forward import get_named_beta_schedule

    return get_named_beta_schedule(schedule, T)


def _guided_eps(net: nn.Module, classifier: nn.Module, guidance: str,
                y: Tensor, sigma: Tensor | float) -> Any:
    """eps(x, t) of the reference's model_wrapper, as a plain function, for
    EDM (which has no guidance): classifier guidance shifts eps by
    sigma_t s grad log p(y | x_t), classifier-free mixes two calls."""
    def eps(x: Tensor, t: Tensor) -> Tensor:
        out = net(x, t, y)
        if guidance == "cfg":
            null = torch.full_like(y, CLASSES)
            out = out + CFG_SCALE * (out - net(x, t, null))
        elif guidance == "classifier":
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                log_p = F.log_softmax(classifier(x_in, t), -1)
                chosen = log_p[torch.arange(len(y)), y].sum()
                grad = torch.autograd.grad(chosen, x_in)[0]
            out = out - CLASSIFIER_SCALE * sigma * grad
        return out
    return eps


def dpm_case(ref: Path, schedule: str, steps: list[int], order: int,
             guidance: str, mean_type: str, nets: dict, noise: Tensor,
             y: Tensor) -> Tensor:
    """DPM_Solver.sample (multistep dpmsolver++, denoise_to_zero) on our
    steps (descending), as our dpm_solver_sample_loop runs them."""
    namespace: dict[str, Any] = {}
    code = (ref / "dpm_solver_pytorch.py").read_text()
    exec(compile(code, str(ref / "dpm_solver_pytorch.py"), "exec"),
         namespace)
    betas = torch.tensor(_betas(schedule))
    ns = namespace["NoiseScheduleVP"]("discrete", betas=betas,
                                      dtype=torch.float64)
    n = ns.total_N  # below T where the log-SNR clip drops steps
    assert max(steps) < n, (schedule, steps, n)
    net, classifier = nets["eps" if mean_type == "eps" else "x0"], \
        nets["classifier"]

    def model(x: Tensor, t_input: Tensor, cond: Tensor | None = None
              ) -> Tensor:
        # The reference shows the network (t - 1/N) 1000 = i 1000 / N.
        return net(x, t_input * n / 1000, y if cond is None else cond)

    def classifier_fn(x: Tensor, t_input: Tensor, cond: Tensor) -> Tensor:
        log_p = F.log_softmax(classifier(x, t_input * n / 1000), -1)
        return log_p[torch.arange(len(cond)), cond]

    kind = {"none": "uncond", "classifier": "classifier",
            "cfg": "classifier-free"}[guidance]
    wrapped = namespace["model_wrapper"](
        model, ns, model_type="noise" if mean_type == "eps" else "x_start",
        guidance_type=kind, condition=y,
        unconditional_condition=torch.full_like(y, CLASSES),
        guidance_scale={"none": 1.0, "classifier": CLASSIFIER_SCALE,
                        "cfg": 1.0 + CFG_SCALE}[guidance],
        classifier_fn=classifier_fn)
    solver = namespace["DPM_Solver"](wrapped, ns,
                                     algorithm_type="dpmsolver++")
    times = torch.tensor([(i + 1) / n for i in steps], dtype=torch.float64)
    solver.get_time_steps = lambda **_: times
    return solver.sample(noise, steps=len(steps) - 1, order=order,
                         method="multistep", lower_order_final=True,
                         denoise_to_zero=True)


def heun_case(ref: Path, schedule: str, num_steps: int, guidance: str,
              nets: dict, noise: Tensor, y: Tensor
              ) -> tuple[Tensor, list[int]]:
    """edm_sampler with iDDPMPrecond's table of the schedule; the output
    and the steps its grid rounds to (descending)."""
    edm = ref / "edm"
    namespace: dict[str, Any] = {"torch": torch, "np": np}
    sampler = _load_source(edm / "generate.py", "edm_sampler", namespace)
    precond = _load_source(edm / "training" / "networks.py", "iDDPMPrecond",
                           namespace)
    abar = np.cumprod(1 - _betas(schedule))
    table = torch.tensor(np.append(np.sqrt((1 - abar) / abar)[::-1], 0.0))

    class Precond(precond):  # its table, and a float64 forward
        def __init__(self) -> None:
            nn.Module.__init__(self)
            self.M, self.u = T, table
            self.sigma_min, self.sigma_max = float(table[T - 1]), float(
                table[0])

        def round_sigma(self, sigma: Any, return_index: bool = False
                        ) -> Tensor:
            sigma = torch.as_tensor(sigma, dtype=torch.float64)
            index = torch.cdist(sigma.reshape(1, -1, 1),
                                self.u.reshape(1, -1, 1)).argmin(2)
            result = index if return_index else self.u[index.flatten()]
            return result.reshape(sigma.shape)

        def forward(self, x: Tensor, sigma: Tensor, class_labels: Any = None
                    ) -> Tensor:
            sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(
                -1, 1, 1, 1)
            c_in = 1 / (sigma**2 + 1).sqrt()
            index = self.M - 1 - self.round_sigma(sigma, return_index=True)
            t = index.flatten().to(torch.float64).expand(len(x))
            s_t = (1 - abar_t(t)).sqrt().view(-1, 1, 1, 1)
            eps = _guided_eps(nets["eps"], nets["classifier"], guidance, y,
                              s_t)(c_in * x, t)
            return x - sigma * eps

    def abar_t(t: Tensor) -> Tensor:
        return torch.tensor(abar)[t.long()]

    net = Precond()
    # The grid edm_sampler steps on, as steps of the diffusion.
    sigma_min, sigma_max, rho = max(0.002, net.sigma_min), min(
        80, net.sigma_max), 7
    k = torch.arange(num_steps, dtype=torch.float64)
    grid = (sigma_max ** (1 / rho) + k / (num_steps - 1)
            * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    steps = (T - 1 - net.round_sigma(grid, return_index=True)).tolist()
    assert len(set(steps)) == len(steps), steps
    first = abar[steps[0]]
    latents = noise / math.sqrt(1 - first)  # latents sigma_0 = noise/alpha
    return sampler(net, latents, y, num_steps=num_steps), steps


def main(ref: Path, out: Path) -> None:
    """Every case, one file per schedule and solver."""
    torch.set_default_dtype(torch.float64)  # the references' tables too
    torch.manual_seed(0)
    nets = {"eps": TinyEps(), "x0": TinyEps(), "classifier": TinyClassifier()}
    noise = torch.randn(BATCH, *IMAGE)
    y = torch.arange(BATCH) % CLASSES
    out.mkdir(parents=True, exist_ok=True)
    for schedule in ("linear", "cosine"):
        cases = []
        last = 995 if schedule == "cosine" else T - 1  # below the clip
        for count in (3, 6, 12):
            steps = np.round(np.linspace(last, 0, count)).astype(int).tolist()
            for order in (1, 2):
                for guidance in ("none", "classifier", "cfg"):
                    cases.append({
                        "solver": "dpm++", "steps": steps, "order": order,
                        "guidance": guidance, "mean_type": "eps",
                        "output": dpm_case(ref, schedule, steps, order,
                                           guidance, "eps", nets, noise,
                                           y)})
            cases.append({
                "solver": "dpm++", "steps": steps, "order": 2,
                "guidance": "classifier", "mean_type": "x0",
                "output": dpm_case(ref, schedule, steps, 2, "classifier",
                                   "x0", nets, noise, y)})
        for count in (3, 6, 10):
            for guidance in ("none", "classifier", "cfg"):
                output, steps = heun_case(ref, schedule, count, guidance,
                                          nets, noise, y)
                cases.append({"solver": "heun", "steps": steps, "order": 2,
                              "guidance": guidance, "mean_type": "eps",
                              "output": output})
        torch.save({"schedule": schedule, "noise": noise, "y": y,
                    "classifier_scale": CLASSIFIER_SCALE,
                    "cfg_scale": CFG_SCALE,
                    "nets": {k: v.state_dict() for k, v in nets.items()},
                    "cases": cases}, out / f"{schedule}.pt")
        print(f"{out / f'{schedule}.pt'}: {len(cases)} cases")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
