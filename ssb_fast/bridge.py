"""The I2SB bridge between a mask x0 and a scan x1 (Liu et al. 2023, arXiv 2302.05872), exactly.

All schedule arithmetic runs in float64 and is stored as float32, as I2SB does. Equation numbers refer
to the I2SB paper.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ssb_fast.kernels import bridge_sample as _bridge_sample_op
from ssb_fast.kernels.bridge_sample import check_t_range, schedule_table


def gaussian_product(sigma1, sigma2):
    """Coefficients of the product of N(x0, σ1²) and N(x1, σ2²): (c1, c2, var), I2SB eq 11."""
    denom = sigma1**2 + sigma2**2
    return sigma2**2 / denom, sigma1**2 / denom, (sigma1**2 * sigma2**2) / denom


def space_indices(num_steps: int, count: int) -> list[int]:
    """I2SB's step spacing: a float stride (n-1)/(count-1) accumulated, each index rounded half to even."""
    frac_stride = 1.0 if count <= 1 else (num_steps - 1) / (count - 1)
    cur, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur))  # Python's round(): half to even, as I2SB
        cur += frac_stride
    return taken


# Far beyond any useful schedule (I2SB uses 1000); a bound keeps a hostile config from allocating terabytes.
MAX_TIMESTEPS = 1_000_000


class Bridge:
    """Schedules and coefficients of the I2SB bridge with a symmetric quadratic beta schedule.

    Attributes (1-D float32 tensors of length n_timesteps, on CPU): betas, std_fwd, std_bwd, std_sb,
    mu_x0, mu_x1, noise_levels. Float64 copies live in `self.f64` for exact host-side coefficients.
    """

    def __init__(self, n_timesteps: int = 1000, beta_max: float = 0.3):
        if (isinstance(n_timesteps, bool) or not isinstance(n_timesteps, int)
                or not 2 <= n_timesteps <= MAX_TIMESTEPS):
            raise ValueError(f"n_timesteps must be an int in [2, {MAX_TIMESTEPS}]; got {n_timesteps!r}")
        if n_timesteps % 2:
            # I2SB mirrors the first half of the schedule; an odd count would lose one step.
            raise ValueError(f"n_timesteps must be even (the schedule is mirrored); got {n_timesteps}")
        if not (isinstance(beta_max, (int, float)) and math.isfinite(beta_max) and beta_max > 0):
            raise ValueError(f"beta_max must be a positive finite number; got {beta_max!r}")
        self.n_timesteps = n = int(n_timesteps)
        self.beta_max = float(beta_max)

        half = np.linspace(1e-4**0.5, (self.beta_max / n) ** 0.5, n, dtype=np.float64) ** 2
        betas = np.concatenate([half[: n // 2], np.flip(half[: n // 2])])
        std_fwd = np.sqrt(np.cumsum(betas))
        std_bwd = np.sqrt(np.flip(np.cumsum(np.flip(betas))))
        # The tables are stored as float32: a beta_max so large that a variance leaves its range would make the
        # coefficients inf or NaN.
        limit = float(np.finfo(np.float32).max)
        with np.errstate(over="ignore", invalid="ignore"):
            mu_x0, mu_x1, var = gaussian_product(std_fwd, std_bwd)
            fits = all(np.isfinite(a).all() and np.abs(a).max() < limit
                       for a in (betas, std_fwd, std_bwd, var, std_fwd**2 * std_bwd**2))
        if not fits:
            raise ValueError(f"beta_max {self.beta_max!r} is too large for n_timesteps {n}: the schedule's "
                             f"variances overflow float32")
        # Every step must add variance, or the posterior between two steps has no noise (δ = 0); with the first
        # beta fixed at 1e-4, a beta_max ~1e12 times larger loses it to float64 rounding.
        if not (np.diff(std_fwd) > 0).all():
            raise ValueError(f"beta_max {self.beta_max!r} is too large for n_timesteps {n}: the smallest betas "
                             f"vanish beside the total variance and some steps add none")
        std_sb = np.sqrt(var)
        # I2SB's network time input: linspace(t0=1e-4, T=1, n) * n.
        noise_levels = np.linspace(1e-4, 1.0, n, dtype=np.float64) * n

        self.f64 = {
            "betas": betas, "std_fwd": std_fwd, "std_bwd": std_bwd, "std_sb": std_sb,
            "mu_x0": mu_x0, "mu_x1": mu_x1, "noise_levels": noise_levels,
        }
        for name, arr in self.f64.items():
            setattr(self, name, torch.tensor(arr, dtype=torch.float32))
        self._device_tables: dict[tuple[str, str], torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"Bridge(n_timesteps={self.n_timesteps}, beta_max={self.beta_max})"

    # ---- steps and posterior coefficients -------------------------------------------------------
    def step_indices(self, nfe: int) -> list[int]:
        """Ascending timesteps for `nfe` network evaluations: I2SB's space_indices(n, nfe + 1)."""
        if isinstance(nfe, bool) or not isinstance(nfe, int) or not 1 <= nfe <= self.n_timesteps - 1:
            raise ValueError(f"nfe must be an int in [1, {self.n_timesteps - 1}]; got {nfe!r}")
        return space_indices(self.n_timesteps, nfe + 1)

    def _check_step(self, name: str, step: int) -> int:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step < self.n_timesteps:
            raise ValueError(f"{name} must be an int in [0, {self.n_timesteps}); got {step!r}")
        return int(step)

    def posterior_coefs(self, prev: int, n: int) -> tuple[float, float, float]:
        """(mu_x0, mu_xn, std) of p(x_prev | x_n, x0̂), I2SB eq 4; std = 0 when prev == 0."""
        prev, n = self._check_step("prev", prev), self._check_step("n", n)
        if prev >= n:
            raise ValueError(f"prev must be < n; got prev={prev}, n={n}")
        std_n, std_prev = self.f64["std_fwd"][n], self.f64["std_fwd"][prev]
        std_delta = math.sqrt(std_n**2 - std_prev**2)
        mu_x0, mu_xn, var = gaussian_product(std_prev, std_delta)
        return float(mu_x0), float(mu_xn), (0.0 if prev == 0 else float(math.sqrt(var)))

    def sampling_coefs(self, steps: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """(K, 4) float32 rows [std_fwd[n], mu_x0, mu_xn, std] for the pairs (steps[k-1] -> steps[k]).

        Row k-1 holds the move from steps[k] down to steps[k-1]; `cfg_step` reads one row per sample.
        """
        if len(steps) < 2 or any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"steps must be strictly ascending with at least 2 entries; got {steps}")
        rows = []
        for prev, n in zip(steps[:-1], steps[1:]):
            rows.append((float(self.f64["std_fwd"][self._check_step("n", n)]), *self.posterior_coefs(prev, n)))
        return torch.tensor(rows, dtype=torch.float32, device=device)

    # ---- training marginal, label and its inverse ----------------------------------------------
    def on(self, name: str, device: torch.device | str) -> torch.Tensor:
        """Schedule `name` (e.g. "std_fwd") on `device`, copied there once and cached."""
        key = (name, str(torch.device(device)))
        if key not in self._device_tables:
            self._device_tables[key] = getattr(self, name).to(key[1])
        return self._device_tables[key]

    def _gather(self, name: str, t, like: torch.Tensor) -> torch.Tensor:
        table = self.on(name, like.device)
        if isinstance(t, torch.Tensor):
            idx = t.to(device=like.device, dtype=torch.int64).reshape(-1)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n_timesteps):
                raise ValueError(f"t must lie in [0, {self.n_timesteps}); got values outside it")
            if idx.numel() not in (1, like.shape[0]):
                raise ValueError(f"t must hold 1 or {like.shape[0]} steps; got {idx.numel()}")
            vals = table[idx]
        else:
            vals = table[self._check_step("t", t)].reshape(1)
        return vals.view(-1, *([1] * (like.dim() - 1))).to(torch.float32)

    def q_sample(self, t, x0: torch.Tensor, x1: torch.Tensor, ot_ode: bool = False,
                 noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t ~ q(x_t | x0, x1) = N(mu_x0 x0 + mu_x1 x1, std_sb²), I2SB eq 11 (the mean only if ot_ode)."""
        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 must have one shape; got {tuple(x0.shape)} and {tuple(x1.shape)}")
        xt = self._gather("mu_x0", t, x0) * x0 + self._gather("mu_x1", t, x0) * x1
        if not ot_ode:
            if noise is None:
                noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
            elif noise.shape != x0.shape:
                raise ValueError(f"noise must have shape {tuple(x0.shape)}; got {tuple(noise.shape)}")
            xt = xt + self._gather("std_sb", t, x0) * noise
        return xt

    def compute_label(self, t, x0: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """The network target (x_t - x0) / std_fwd[t]."""
        return (x_t - x0) / self._gather("std_fwd", t, x_t)

    def compute_pred_x0(self, t, x_t: torch.Tensor, net_out: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """The label's inverse: x0̂ = x_t - std_fwd[t] * out, clamped to [-1, 1] by default."""
        x0 = x_t - self._gather("std_fwd", t, x_t) * net_out
        return x0.clamp(-1.0, 1.0) if clamp else x0

    def time_input(self, t: torch.Tensor) -> torch.Tensor:
        """What the network sees as time: I2SB's noise_levels[t] = linspace(1e-4, 1, n)[t] * n."""
        return self.on("noise_levels", t.device)[t.to(torch.int64)]

    # ---- fused training pair ---------------------------------------------------------------------
    def schedule(self, device: torch.device | str) -> torch.Tensor:
        """(4, n) float32 table [mu_x0, mu_x1, std_sb, std_fwd] on `device`, for `bridge_sample`."""
        key = ("schedule", str(torch.device(device)))
        if key not in self._device_tables:
            table = schedule_table(self.mu_x0, self.mu_x1, self.std_sb, self.std_fwd)
            self._device_tables[key] = table.to(key[1])
        return self._device_tables[key]

    def bridge_sample(self, t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, seeds: torch.Tensor,
                      ot_ode: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, label) in one fused pass, the noise keyed by per-sample `seeds` (int64, (B,)).

        Give t on the CPU: it is range-checked there and moved to x0's device without a host sync."""
        schedule = self.schedule(x0.device)
        check_t_range(t, schedule.shape[1])
        return _bridge_sample_op(x0, x1, t.to(x0.device, non_blocking=True), schedule,
                                 seeds.to(x0.device, non_blocking=True), ot_ode)
