"""Can a bridge setting draw a mask with the readers' odds? The sampler run with a Bayes-optimal network.

Where readers disagree on whether a nodule is there at all, a sampler should mark it as often as they do:
with P(marked) = 0.3, about 30% of its masks. I2SB's bridge starts every mask of a scan at the same point
(x_T = the scan), so all of that choice must come from the noise the sampler adds on the way. When the
bridge's noise is small next to the signal of a whole region (the region's mean noise falls as
1/sqrt(area)), the choice is made at the first step by the posterior mean alone, and the sampler draws the
more likely outcome nearly every time: the per-label mode, not the distribution.

`OddsOracle` is the network a perfect model would be for one such region: every pixel of the region is
+1 with probability `prior`, else -1, and it returns the exact posterior mean of x0 given x_t under the
bridge's marginal (the same for every pixel; the region mean of x_t is its sufficient statistic).
`drawn_share` runs the project's own `Sampler` on it and reports how often the masks mark the region. Any
gap between that share and `prior` is the sampler's (its step count and the bridge's noise), not a
model's; the test suite also uses it to check the posterior step itself. `ssb-fast bench bridge-odds`
tabulates it over beta_max, NFE, region area and P(marked).
"""

from __future__ import annotations

import datetime as _dt
import itertools
import math

import torch
from ssb_fast.bench.environment import versions

from ssb_fast.bridge import Bridge
from ssb_fast.sampler import Sampler


class OddsOracle:
    """The Bayes-optimal network target for one region of `area` pixels that is marked (+1) with
    probability `prior`, else empty (-1); the scan (x1) is the sampler's, read from the input."""

    def __init__(self, bridge: Bridge, prior: float, area: int):
        if not 0.0 < prior < 1.0:
            raise ValueError(f"prior must lie in (0, 1); got {prior!r}")
        if area < 1:
            raise ValueError(f"area must be >= 1 pixel; got {area!r}")
        self.bridge, self.area = bridge, int(area)
        self.log_odds = math.log(prior) - math.log1p(-prior)
        self.null_label = 1  # one expert label (0) and the null label

    def _index(self, t_in: torch.Tensor) -> torch.Tensor:
        levels = self.bridge.noise_levels.to(t_in.device)
        return (t_in.view(-1, 1) - levels.view(1, -1)).abs().argmin(1)

    def __call__(self, x: torch.Tensor, t_in: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        x_t, x1 = x[:, :1].double(), x[:, 1:2].double()
        t = self._index(t_in)
        mu0, mu1, sd, fwd = (self.bridge.f64[name][t.cpu().numpy()] for name in ("mu_x0", "mu_x1", "std_sb",
                                                                                    "std_fwd"))
        mu0, mu1, sd, fwd = (torch.as_tensor(v, device=x.device).view(-1, 1, 1, 1) for v in (mu0, mu1, sd, fwd))
        # Region means: r = mu0 x0 + mu1 mean(x1) + sd / sqrt(area) z, with x0 = +1 or -1 everywhere.
        r = (x_t - mu1 * x1).mean(dim=(2, 3), keepdim=True)
        var = (sd * sd).clamp_min(1e-30) / self.area
        # log p(r | +1) - log p(r | -1) = ((r + mu0)^2 - (r - mu0)^2) / (2 var) = 2 mu0 r / var
        logit = self.log_odds + 2.0 * mu0 * r / var
        x0 = torch.tanh(logit / 2.0)  # E[x0 | r] = P(+1) - P(-1)
        return ((x_t - x0) / fwd).to(x.dtype)


def drawn_share(bridge: Bridge, nfe: int, prior: float, area: int, n_draws: int = 2000, seed: int = 0,
                scan_value: float = 0.0, first_step_noise: float = 1.0) -> float:
    """Share of `n_draws` masks that mark the region (more than half its pixels), from the project's
    `Sampler` with guidance 1 and the `OddsOracle` for (prior, area). A faithful sampler returns ~prior."""
    oracle = OddsOracle(bridge, prior, area)
    width = max(1, int(math.isqrt(area)))
    while area % width:
        width -= 1
    scan = torch.full((1, 1, area // width, width), float(scan_value))
    sampler = Sampler(oracle, bridge, nfe=nfe, guidance=1.0, n_labels=1, null_label=1, seed=seed, device="cpu",
                      max_batch=512, first_step_noise=first_step_noise)
    masks = sampler.sample(scan, n_draws).masks  # (1, N, H, W)
    return float((masks.flatten(2).float().mean(-1) > 0.5).float().mean())


def odds_table(beta_maxes: list[float], nfes: list[int], areas: list[int], priors: list[float],
               n_timesteps: int = 1000, n_draws: int = 2000, seed: int = 0, log=None,
               first_step_noises=(1.0,)) -> list[dict]:
    """One row per (beta_max, nfe, first-step noise, area, prior): the share drawn, its binomial standard
    error and the gap."""
    rows = []
    for beta_max in beta_maxes:
        bridge = Bridge(n_timesteps, beta_max)
        for nfe, noise, area, prior in itertools.product(nfes, first_step_noises, areas, priors):
            share = drawn_share(bridge, nfe, prior, area, n_draws, seed, first_step_noise=noise)
            rows.append({"beta_max": beta_max, "nfe": nfe, "first_step_noise": noise, "area": area, "prior": prior,
                         "drawn": share, "se": math.sqrt(max(share * (1 - share), 1e-12) / n_draws),
                         "gap": share - prior})
            if log:
                log(f"beta_max {beta_max:g}, NFE {nfe}, first-step noise {noise:g}, area {area} px, "
                    f"P(marked) {prior:g}: {share:.3f}")
    return rows


def run_bridge_odds(beta_maxes: list[float], nfes: list[int], areas: list[int], priors: list[float],
                    n_timesteps: int = 1000, n_draws: int = 2000, seed: int = 0, log=None,
                    first_step_noises=(1.0,)) -> dict:
    """The report of `bench bridge-odds`: the table and what produced it (CPU; the oracle is arithmetic)."""
    return {"kind": "bridge-odds", "date": _dt.date.today().isoformat(), "device": "cpu",
            "versions": versions("cpu"), "n_timesteps": n_timesteps, "n_draws": n_draws, "seed": seed,
            "rows": odds_table(beta_maxes, nfes, areas, priors, n_timesteps, n_draws, seed, log,
                               first_step_noises)}


def render_markdown(report: dict) -> str:
    # Reports written before the first-step noise was an axis sampled with I2SB's posterior noise (1).
    rows = [{"first_step_noise": 1.0, **r} for r in report["rows"]]
    areas = sorted({r["area"] for r in rows})
    priors = sorted({r["prior"] for r in rows})
    cols = [(a, p) for p in priors for a in areas]
    lines = [f"# Can the sampler draw a region with the readers' odds? {report['date']}", "",
             f"Share of {report['n_draws']} masks that mark a region of A pixels which is marked with probability "
             f"P, from the project's sampler (guidance 1, n_timesteps {report['n_timesteps']}, seed "
             f"{report['seed']}) run with the Bayes-optimal network for that region. A faithful sampler draws "
             "P; a gap is the sampler's (too few steps, too little bridge noise), not a model's. Binomial "
             "standard error ≤ " + f"{max(r['se'] for r in rows):.3f}.", "",
             "| beta_max | NFE | first-step noise | " + " | ".join(f"P {p:g}, A {a}" for a, p in cols) + " |",
             "| ---: | ---: | ---: |" + " ---: |" * len(cols)]
    index = {(r["beta_max"], r["nfe"], r["first_step_noise"], r["area"], r["prior"]): r["drawn"] for r in rows}
    for key in dict.fromkeys((r["beta_max"], r["nfe"], r["first_step_noise"]) for r in rows):
        lines.append(f"| {key[0]:g} | {key[1]} | {key[2]:g} | "
                     + " | ".join(f"{index[(*key, a, p)]:.3f}" for a, p in cols) + " |")
    lines += ["", "first-step noise: the factor on the standard deviation of the noise the first step adds (1 = "
              "I2SB's posterior); the first step decides whether a region is marked, since every mask starts at "
              "the scan.", "", f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}."]
    return "\n".join(lines) + "\n"
