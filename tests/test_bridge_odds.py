"""The sampler run with a Bayes-optimal network: does a bridge setting draw a region with the readers' odds?

These pin two things: the posterior step draws the right distribution when the bridge has enough noise
(a wrong noise scale or mean coefficient moves the share away from P), and with I2SB's beta_max 0.3 the
first step alone decides, so the sampler draws the likelier outcome nearly always.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from ssb_fast.bench.bridge_odds import OddsOracle, drawn_share, odds_table
from typer.testing import CliRunner

from ssb_fast.bridge import Bridge
from ssb_fast.cli import app


def test_oracle_is_the_posterior_mean_of_a_two_outcome_region():
    bridge = Bridge(1000, 10.0)
    oracle = OddsOracle(bridge, prior=0.3, area=16)
    x1 = torch.zeros(2, 1, 4, 4)
    # Near t = 0 the marginal is x0 itself: the oracle returns x0̂ = the region's sign.
    t = 1
    levels = bridge.noise_levels[t].expand(2)
    x0 = torch.stack([torch.ones(1, 4, 4), -torch.ones(1, 4, 4)])
    x_t = bridge.q_sample(t, x0, x1, ot_ode=True)
    out = oracle(torch.cat([x_t, x1], 1), levels, torch.zeros(2, dtype=torch.int64))
    x0_hat = bridge.compute_pred_x0(t, x_t, out)
    assert torch.allclose(x0_hat, x0, atol=1e-4)
    # At the start (x_t = x1) nothing has been seen: x0̂ = the prior mean 2P - 1, on every pixel.
    t = bridge.n_timesteps - 1
    out = oracle(torch.cat([x1, x1], 1), bridge.noise_levels[t].expand(2), torch.zeros(2, dtype=torch.int64))
    assert torch.allclose(bridge.compute_pred_x0(t, x1, out), torch.full_like(x1, 2 * 0.3 - 1), atol=1e-4)


@pytest.mark.parametrize("prior", [0.3, 0.6])
def test_a_noisy_bridge_draws_the_region_with_its_odds(prior):
    share = drawn_share(Bridge(1000, 30.0), nfe=20, prior=prior, area=30, n_draws=1500)
    se = math.sqrt(prior * (1 - prior) / 1500)
    assert abs(share - prior) < 0.03 + 3 * se, share


def test_i2sb_beta_max_draws_the_likelier_outcome_nearly_always():
    bridge = Bridge(1000, 0.3)
    assert drawn_share(bridge, nfe=10, prior=0.3, area=50, n_draws=800) < 0.06
    assert drawn_share(bridge, nfe=10, prior=0.6, area=50, n_draws=800) > 0.8


def test_more_first_step_noise_lets_a_large_region_be_drawn_with_its_odds():
    """With I2SB's posterior noise a 300-pixel region marked with P = 0.3 is drawn in ~20% of the masks at
    NFE 20 (its mean noise falls as 1/sqrt(area)); 1.5 times the first step's noise brings that to ~P, and
    the scale is the only change (the shares move monotonically with it)."""
    bridge = Bridge(1000, 10.0)
    shares = [drawn_share(bridge, nfe=20, prior=0.3, area=300, n_draws=1000, first_step_noise=s)
              for s in (1.0, 1.5, 3.0)]
    assert shares[0] < 0.25 and abs(shares[1] - 0.3) < 0.04 and shares[2] > 0.35, shares
    rows = odds_table([10.0], [20], [300], [0.3], n_draws=1000, first_step_noises=(1.0, 1.5))
    assert [(r["first_step_noise"], r["drawn"]) for r in rows] == [(1.0, shares[0]), (1.5, shares[1])]


def test_odds_table_rows_and_bad_priors():
    rows = odds_table([3.0], [5], [10], [0.5], n_draws=200)
    assert len(rows) == 1 and rows[0]["gap"] == pytest.approx(rows[0]["drawn"] - 0.5)
    with pytest.raises(ValueError, match="prior"):
        OddsOracle(Bridge(), prior=1.0, area=4)


def test_bench_bridge_odds_writes_the_table_and_refuses_bad_options(tmp_path):
    runner = CliRunner()
    out = tmp_path / "odds"
    result = runner.invoke(app, ["bench", "bridge-odds", "--beta-max", "0.3,30", "--nfe", "10", "--area", "50",
                                 "--prior", "0.3", "--draws", "400", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bridge-odds.json").read_text())
    by_beta = {r["beta_max"]: r["drawn"] for r in report["rows"]}
    assert by_beta[0.3] < 0.1 < 0.2 < by_beta[30.0]
    assert "| 0.3 | 10 | 1 |" in (out / "bridge-odds.md").read_text()
    for bad in (["--prior", "1.5"], ["--nfe", "0"], ["--n-timesteps", "999"], ["--first-step-noise", "0"],
                ["--first-step-noise", "nan"]):
        result = runner.invoke(app, ["bench", "bridge-odds", *bad, "--out", str(out)])
        assert result.exit_code == 2, (bad, result.output)
