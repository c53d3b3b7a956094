"""Metrics of ambiguous segmentation: how right and how diverse N sampled masks are against M experts.

GED, D_max, D_a, S_c, the CI score, HM-IoU and the Diversity Divergence Index (DDI), per scan and
batched over scans. Every pair quantity comes from one `ssb_fast::pair_counts` call per batch: the
exact Gram matrix of intersections of the K = N + M masks (plus the two unions S_c needs), whose
diagonal holds the mask sizes, so |a ∪ b| = |a| + |b| − |a ∩ b|. The rest is vectorised torch on the
(B, K, K) Gram, `ssb_fast::pairwise_jsd` for DDI, and scipy's Hungarian matching for HM-IoU.

Conventions (the project's; each function's docstring repeats the ones it uses):
- masks are binary; d(a, b) = 1 − IoU(a, b); IoU(∅, ∅) = 1 and Dice(∅, ∅) = 1 (so d(∅, ∅) = 0),
  as in PHiSeg's and CCDM's GED code; one empty and one non-empty mask have IoU = Dice = 0;
- missing annotators (`present` False) are left out of every mean, max, min and union;
- results depend on N (GED over 16 samples is not GED over 100): `evaluate` reports N with them.

Inputs: `samples` (N, H, W) or (B, N, H, W) and `experts` (M, H, W) or (B, M, H, W), torch tensors
or numpy arrays, bool, integer or float holding only 0 and 1. One scan gives Python floats; a batch
gives (B,) float64 CPU tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ssb_fast.kernels import pair_counts, pairwise_jsd

METRIC_NAMES = ("ged", "d_max", "d_a", "s_c", "ci", "hm_iou", "ddi_e", "ddi_g")
PAIR_DISTANCES = ("dice", "pixel_variance")

# How every undefined or empty case is treated; `evaluate` and the CLI report it with the numbers.
CONVENTIONS = {
    "distance": "d = 1 - IoU on binary masks",
    "iou_of_two_empty_masks": 1.0,
    "dice_of_two_empty_masks": 1.0,
    "ged": "squared form D^2_GED = 2 E d(S,Y) - E d(S,S') - E d(Y,Y'), means over all ordered pairs "
           "including i = j",
    "s_c_when_expert_union_empty": 1.0,
    "d_a_pair_distance": "V = 1 - Dice over pairs i < j inside a set; a set of one mask has V = 0",
    "ci_when_s_c_d_max_d_a_all_zero": 0.0,
    "hm_iou": "Hungarian matching on 1 - IoU after repeating both sets up to lcm(N, M)",
    "ddi": "Dice rows/columns normalised to distributions (uniform when all zero), Jensen-Shannon base 2; "
           "0 when a side has fewer than two masks",
    "missing_experts": "excluded from every mean, max, min and union",
}

_MASK_KINDS = "bool, integer or float"


# ----------------------------------------------------------------------------------------- inputs
def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        arr = np.asarray(x)
    except Exception as err:  # noqa: BLE001 - re-raised with the argument's name
        raise TypeError(f"{name} must be a torch tensor or a numpy array; got {type(x).__name__}") from err
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold {_MASK_KINDS} mask values; got numpy dtype {arr.dtype}")
    if not arr.flags.writeable:
        arr = arr.copy()  # torch.from_numpy warns on read-only memory (e.g. memory-mapped files)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _first_index(bad: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0].tolist())


def _check_binary(x: torch.Tensor, name: str) -> None:
    """Masks must hold only 0 and 1 (bool always does); NaN/Inf and other values name their index."""
    if x.dtype == torch.bool or x.numel() == 0:
        return
    if x.is_floating_point():
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            idx = _first_index(~finite)
            raise ValueError(f"{name} must be binary masks (0/1); found {float(x[idx])} at index {idx}")
        ok = bool(((x == 0) | (x == 1)).all())
    elif x.dtype == torch.uint8:
        ok = int(x.max()) <= 1  # one reduction instead of two comparisons
    elif x.dtype.is_complex:
        raise TypeError(f"{name} must hold {_MASK_KINDS} mask values; got {x.dtype}")
    else:
        ok = int(x.min()) >= 0 and int(x.max()) <= 1
    if not ok:
        bad = (x != 0) & (x != 1)
        idx = _first_index(bad)
        value = x[idx].item()
        raise ValueError(f"{name} must be binary masks (0/1); found value {value} at index {idx}")


@dataclass
class MaskSets:
    """Validated masks of a batch laid out for one `pair_counts` call.

    `masks` is (B, N + M + 2, H·W) uint8: rows [0, N) samples, [N, N + M) experts (missing ones
    zeroed), then the union of present experts and the union of samples (for S_c).
    """

    masks: torch.Tensor
    present: torch.Tensor  # (B, M) bool, on the CPU
    n_samples: int
    n_experts: int
    batched: bool

    @property
    def batch(self) -> int:
        return self.masks.shape[0]


def prepare(samples, experts, present=None, device: torch.device | str | None = None) -> MaskSets:
    """Validate `samples`, `experts` and `present` and stack them for one `pair_counts` call."""
    s = _as_tensor(samples, "samples")
    e = _as_tensor(experts, "experts")
    if device is None:
        device = s.device
    device = torch.device(device)
    if s.dim() not in (3, 4):
        raise ValueError(f"samples must be (N, H, W) for one scan or (B, N, H, W) for a batch; "
                         f"got shape {tuple(s.shape)}")
    if e.dim() != s.dim():
        want = "(M, H, W)" if s.dim() == 3 else "(B, M, H, W)"
        raise ValueError(f"experts must be {want} to match samples of shape {tuple(s.shape)}; "
                         f"got shape {tuple(e.shape)}")
    batched = s.dim() == 4
    if not batched:
        s, e = s.unsqueeze(0), e.unsqueeze(0)
    if s.shape[0] != e.shape[0]:
        raise ValueError(f"samples and experts must cover the same scans; got B = {s.shape[0]} "
                         f"(samples {tuple(s.shape)}) and B = {e.shape[0]} (experts {tuple(e.shape)})")
    if s.shape[2:] != e.shape[2:]:
        raise ValueError(f"samples and experts must have the same H x W; got {tuple(s.shape[2:])} "
                         f"and {tuple(e.shape[2:])}")
    batch, n, height, width = s.shape
    m = e.shape[1]
    if n == 0:
        raise ValueError(f"samples holds no masks (N = 0, shape {tuple(s.shape)}); "
                         f"every metric needs at least one sample")
    if m == 0:
        raise ValueError(f"experts holds no masks (M = 0, shape {tuple(e.shape)}); "
                         f"every metric needs at least one expert")
    _check_binary(s, "samples")
    _check_binary(e, "experts")
    pres = _present_mask(present, batch, m, batched)

    pixels = height * width
    s8 = s.to(device=device, dtype=torch.uint8).reshape(batch, n, pixels)
    e8 = e.to(device=device, dtype=torch.uint8).reshape(batch, m, pixels)
    if not bool(pres.all()):
        e8 = e8 * pres.to(device=device, dtype=torch.uint8)[:, :, None]
    unions = torch.stack([e8.amax(dim=1), s8.amax(dim=1)], dim=1)
    masks = torch.cat([s8, e8, unions], dim=1)
    return MaskSets(masks=masks, present=pres, n_samples=n, n_experts=m, batched=batched)


def _present_mask(present, batch: int, m: int, batched: bool) -> torch.Tensor:
    """(B, M) bool flags of the experts who annotated each scan; every scan needs at least one."""
    if present is None:
        return torch.ones(batch, m, dtype=torch.bool)
    p = _as_tensor(present, "present").cpu()
    shapes = [(m,), (batch, m)] if batched else [(m,)]
    if tuple(p.shape) not in shapes:
        want = " or ".join(str(sh) for sh in shapes)
        raise ValueError(f"present must have shape {want} (one flag per expert, True = annotated); "
                         f"got {tuple(p.shape)}")
    if p.dtype != torch.bool:
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ValueError("present must be bool (True = the expert annotated this scan); found NaN or Inf")
        if not bool(((p == 0) | (p == 1)).all()):
            found = sorted(set(p.flatten().tolist()))[:6]
            raise ValueError(f"present must be bool or 0/1; found values {found}")
        p = p != 0
    p = p.expand(batch, m).contiguous()
    empty = (~p).all(dim=1)
    if bool(empty.any()):
        scans = empty.nonzero().flatten().tolist()
        where = f"scan {scans[0]}" if batched else "the scan"
        more = f" (and {len(scans) - 1} more)" if len(scans) > 1 else ""
        raise ValueError(f"{where}{more} has no present expert (present is all False): "
                         f"every metric needs at least one annotation")
    return p


# ------------------------------------------------------------------------------------ pair stats
class PairStats:
    """All metrics of a batch from one exact intersection Gram (one `pair_counts` call).

    Build it once (`pair_stats(samples, experts, present)`), then ask for any metric; every method
    returns a (B,) float64 CPU tensor.
    """

    def __init__(self, sets: MaskSets):
        self.sets = sets
        n, m = sets.n_samples, sets.n_experts
        k = n + m
        gram = pair_counts(sets.masks).to(device="cpu", dtype=torch.float64)
        inter = gram[:, :k, :k]
        sizes = torch.diagonal(inter, dim1=1, dim2=2)
        pair_sum = sizes[:, :, None] + sizes[:, None, :]
        union = pair_sum - inter
        one = torch.ones((), dtype=torch.float64)
        # IoU(∅, ∅) = Dice(∅, ∅) = 1: two empty masks agree perfectly.
        self.iou = torch.where(union > 0, inter / torch.where(union > 0, union, one), one)
        self.dice = torch.where(pair_sum > 0, 2 * inter / torch.where(pair_sum > 0, pair_sum, one), one)
        self.inter, self.sizes = inter, sizes
        self.pixels = sets.masks.shape[2]
        self.union_experts = gram[:, k, k]
        self.union_both = gram[:, k, k + 1]
        self.w_experts = sets.present.to(torch.float64)           # (B, M)
        self.m_present = self.w_experts.sum(dim=1)                 # (B,)
        self.n, self.m = n, m

    # index helpers: S = samples [0, n), Y = experts [n, n + m)
    def _ss(self, x):
        return x[:, : self.n, : self.n]

    def _yy(self, x):
        return x[:, self.n :, self.n :]

    def _sy(self, x):
        return x[:, : self.n, self.n :]

    def ged(self) -> torch.Tensor:
        """Squared generalised energy distance D²_GED = 2 E d(S,Y) − E d(S,S′) − E d(Y,Y′), d = 1 − IoU.

        Means over all ordered pairs including i = j (d(x, x) = 0), IoU(∅, ∅) = 1: the form of
        PHiSeg's `generalised_energy_distance` (foreground label) and CCDM's batched GED, which agree
        (a CIMD-derived script can instead average within a set over j ≥ i only; not followed).
        """
        d = 1.0 - self.iou
        w = self.w_experts
        m_b = self.m_present
        cross = (self._sy(d) * w[:, None, :]).sum(dim=(1, 2)) / (self.n * m_b)
        within_s = self._ss(d).sum(dim=(1, 2)) / (self.n * self.n)
        within_y = (self._yy(d) * w[:, :, None] * w[:, None, :]).sum(dim=(1, 2)) / (m_b * m_b)
        return 2.0 * cross - within_s - within_y

    def d_max(self) -> torch.Tensor:
        """Maximum Dice matching: mean over present experts of the best Dice among the samples.

        Dice(∅, ∅) = 1, so an empty expert is matched perfectly by an empty sample. Some public
        CIMD-derived scripts replace a best Dice of 0 by 1; that is not followed here.
        """
        best = self._sy(self.dice).amax(dim=1)  # (B, M)
        return (best * self.w_experts).sum(dim=1) / self.m_present

    @staticmethod
    def _spread(v: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(max V, min V) over the valid pairs of one set; (0, 0) when the set has a single mask."""
        count = valid.sum(dim=(1, 2))
        vmax = torch.where(valid, v, torch.full_like(v, -math.inf)).amax(dim=(1, 2))
        vmin = torch.where(valid, v, torch.full_like(v, math.inf)).amin(dim=(1, 2))
        zero = torch.zeros_like(vmax)
        return torch.where(count > 0, vmax, zero), torch.where(count > 0, vmin, zero)

    def _pixel_variance(self, idx: slice) -> torch.Tensor:
        """Per-pixel variance of a − b for 0/1 masks: |a △ b|/P − ((|a| − |b|)/P)², from the Gram."""
        inter = self.inter[:, idx, idx]
        sizes = self.sizes[:, idx]
        p = max(self.pixels, 1)
        sym_diff = sizes[:, :, None] + sizes[:, None, :] - 2 * inter
        mean = (sizes[:, :, None] - sizes[:, None, :]) / p
        return sym_diff / p - mean * mean

    def d_a(self, pair_distance: str = "dice") -> torch.Tensor:
        """Diversity agreement D_a = 1 − (|maxV_Y − maxV_S| + |minV_Y − minV_S|) / 2.

        V is taken over pairs i < j inside each set (present experts only). ssb-fast picks
        V = 1 − Dice (`pair_distance="dice"`, the default). Public CIMD-derived scripts differ here:
        some use the per-pixel variance of a − b (`pair_distance="pixel_variance"`, computed from
        the same Gram), one of them also over i = j pairs (so its min V is always 0); that form
        is not followed. A set of one mask has no pair: its V is taken as 0 (no diversity).
        """
        if pair_distance not in PAIR_DISTANCES:
            raise ValueError(f"pair_distance must be one of {', '.join(PAIR_DISTANCES)}; "
                             f"got {pair_distance!r}")
        n, m = self.n, self.m
        tri_s = torch.ones(n, n, dtype=torch.bool).triu(1)
        tri_y = torch.ones(m, m, dtype=torch.bool).triu(1)
        pres = self.sets.present
        valid_y = tri_y[None] & pres[:, :, None] & pres[:, None, :]
        valid_s = tri_s[None].expand(self.sets.batch, n, n)
        if pair_distance == "dice":
            v_y, v_s = 1.0 - self._yy(self.dice), 1.0 - self._ss(self.dice)
        else:
            v_y, v_s = self._pixel_variance(slice(n, n + m)), self._pixel_variance(slice(0, n))
        y_max, y_min = self._spread(v_y, valid_y)
        s_max, s_min = self._spread(v_s, valid_s)
        return 1.0 - ((y_max - s_max).abs() + (y_min - s_min).abs()) / 2.0

    def s_c(self) -> torch.Tensor:
        """Combined sensitivity TP / (TP + FN) between the union of present experts and the union of samples.

        S_c = 1 when the expert union is empty (nothing to find: ssb-fast's choice). Public scripts
        disagree there: some return 1 only when both unions are empty and divide by zero otherwise,
        one returns 1 whenever TP = 0. They agree whenever the expert union is not empty.
        """
        found = self.union_experts > 0
        return torch.where(found, self.union_both / torch.where(found, self.union_experts, 1.0),
                           torch.ones_like(self.union_experts))

    def ci(self, pair_distance: str = "dice") -> torch.Tensor:
        """CI score 3·S_c·D_max·D_a / (S_c + D_max + D_a) (the form in public CIMD-derived code).

        ssb-fast picks this form; one public script uses the true harmonic mean 3 / (1/S_c + 1/D_max
        + 1/D_a) instead, which differs unless the three are equal. 0 when all three are 0 (the code
        it follows divides 0 by 0 there).
        """
        return combine_ci(self.s_c(), self.d_max(), self.d_a(pair_distance))

    def hm_iou(self) -> torch.Tensor:
        """Hungarian-matched IoU: both sets repeated up to L = lcm(N, M), matched on 1 − IoU, mean IoU.

        As CCDM's `batched_hungarian_matching` (IoU(∅, ∅) = 1; its repeat_interleave order gives the
        same optimum); M counts present experts only. Runs scipy's `linear_sum_assignment` per scan
        on the CPU, on an L x L matrix: about 1 ms at L = 256, 0.3 s at L = 3000.
        """
        from scipy.optimize import linear_sum_assignment

        iou_ys = self._sy(self.iou).transpose(1, 2).numpy()  # (B, M, N): experts x samples
        pres = self.sets.present.numpy()
        out = np.empty(self.sets.batch, dtype=np.float64)
        for b in range(self.sets.batch):
            cost = 1.0 - iou_ys[b][pres[b]]
            m_b, n = cost.shape
            lcm = math.lcm(m_b, n)
            cost = np.repeat(np.repeat(cost, lcm // m_b, axis=0), lcm // n, axis=1)
            rows, cols = linear_sum_assignment(cost)
            out[b] = float((1.0 - cost[rows, cols]).mean())
        return torch.from_numpy(out)

    def ddi(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Diversity Divergence Index (DDI_e, DDI_g) from the M x N Dice matrix D (experts x samples).

        Row i of D normalised to a distribution P_i over samples, column j to Q_j over present
        experts (uniform when the row or column is all zero). DDI_e = mean over i ≠ k of JS(P_i, P_k),
        DDI_g = mean over j ≠ l of JS(Q_j, Q_l), Jensen–Shannon base 2 with 0·log 0 = 0, so each
        lies in [0, 1]; 0 when a side has fewer than two masks (no pair to compare).
        """
        dice = self._sy(self.dice).transpose(1, 2)  # (B, M, N)
        w = self.w_experts
        batch, m, n = dice.shape
        row_sum = dice.sum(dim=2, keepdim=True)
        p_rows = torch.where(row_sum > 0, dice / torch.where(row_sum > 0, row_sum, 1.0),
                             torch.full_like(dice, 1.0 / n))
        dcols = dice * w[:, :, None]
        col_sum = dcols.sum(dim=1, keepdim=True)
        uniform = (w / self.m_present[:, None])[:, :, None].expand(batch, m, n)
        q_cols = torch.where(col_sum > 0, dcols / torch.where(col_sum > 0, col_sum, 1.0), uniform)
        device = self.sets.masks.device
        js_e = pairwise_jsd(p_rows.to(device=device, dtype=torch.float32)).to("cpu", torch.float64)
        js_g = pairwise_jsd(q_cols.transpose(1, 2).contiguous().to(device=device, dtype=torch.float32))
        js_g = js_g.to("cpu", torch.float64)
        off_e = (w[:, :, None] * w[:, None, :]) * (1.0 - torch.eye(m, dtype=torch.float64))
        pairs_e = self.m_present * (self.m_present - 1)
        ddi_e = torch.where(pairs_e > 0, (js_e * off_e).sum(dim=(1, 2)) / pairs_e.clamp_min(1), 0.0)
        off_g = 1.0 - torch.eye(n, dtype=torch.float64)
        if n > 1:
            ddi_g = (js_g * off_g).sum(dim=(1, 2)) / (n * (n - 1))
        else:
            ddi_g = torch.zeros(batch, dtype=torch.float64)
        return ddi_e, ddi_g

    def all(self) -> dict[str, torch.Tensor]:
        """Every metric as (B,) tensors, S_c, D_max and D_a computed once for CI."""
        s_c, d_max, d_a = self.s_c(), self.d_max(), self.d_a()
        ddi_e, ddi_g = self.ddi()
        return {
            "ged": self.ged(), "d_max": d_max, "d_a": d_a, "s_c": s_c, "ci": combine_ci(s_c, d_max, d_a),
            "hm_iou": self.hm_iou(), "ddi_e": ddi_e, "ddi_g": ddi_g,
        }


def combine_ci(s_c: torch.Tensor, d_max: torch.Tensor, d_a: torch.Tensor) -> torch.Tensor:
    """CI = 3·S_c·D_max·D_a / (S_c + D_max + D_a); 0 where the denominator is 0."""
    denom = s_c + d_max + d_a
    return torch.where(denom > 0, 3.0 * s_c * d_max * d_a / torch.where(denom > 0, denom, 1.0),
                       torch.zeros_like(denom))


def pair_stats(samples, experts, present=None, device: torch.device | str | None = None) -> PairStats:
    """Validate the masks and compute their intersection Gram once; ask the result for any metric."""
    return PairStats(prepare(samples, experts, present, device))


def _out(value: torch.Tensor, batched: bool):
    return value if batched else float(value[0])


# ------------------------------------------------------------------------------------ public API
def ged(samples, experts, present=None):
    """Squared generalised energy distance, d = 1 − IoU, IoU(∅, ∅) = 1.

    2·mean d(S, Y) − mean d(S, S′) − mean d(Y, Y′), each mean over all ordered pairs including
    i = j (as PHiSeg and CCDM compute it). Lower is better; ≥ 0 up to rounding.
    """
    stats = pair_stats(samples, experts, present)
    return _out(stats.ged(), stats.sets.batched)


def d_max(samples, experts, present=None):
    """Maximum Dice matching: mean over (present) experts of max over samples of Dice; Dice(∅, ∅) = 1."""
    stats = pair_stats(samples, experts, present)
    return _out(stats.d_max(), stats.sets.batched)


def d_a(samples, experts, present=None, pair_distance: str = "dice"):
    """Diversity agreement 1 − (|maxV_Y − maxV_S| + |minV_Y − minV_S|)/2, V over pairs i < j in a set.

    V = 1 − Dice (Dice(∅, ∅) = 1) or, with `pair_distance="pixel_variance"`, the
    per-pixel variance of a − b that some public CIMD-derived scripts use. A single-mask set has V = 0.
    """
    stats = pair_stats(samples, experts, present)
    return _out(stats.d_a(pair_distance), stats.sets.batched)


def s_c(samples, experts, present=None):
    """Combined sensitivity TP/(TP + FN): the union of samples against the union of (present) experts.

    1 when the expert union is empty (ssb-fast's convention).
    """
    stats = pair_stats(samples, experts, present)
    return _out(stats.s_c(), stats.sets.batched)


def ci_score(samples, experts, present=None, pair_distance: str = "dice"):
    """CI = 3·S_c·D_max·D_a/(S_c + D_max + D_a), 0 when all three are 0; each term keeps its conventions."""
    stats = pair_stats(samples, experts, present)
    return _out(stats.ci(pair_distance), stats.sets.batched)


def hm_iou(samples, experts, present=None):
    """Hungarian-matched IoU after repeating both sets up to lcm(N, M) (CCDM's form); IoU(∅, ∅) = 1."""
    stats = pair_stats(samples, experts, present)
    return _out(stats.hm_iou(), stats.sets.batched)


def ddi(samples, experts, present=None):
    """Diversity Divergence Index (DDI_e, DDI_g): mean pairwise Jensen–Shannon (base 2) between the
    experts' and between the samples' normalised Dice profiles; each in [0, 1], 0 for a single mask."""
    stats = pair_stats(samples, experts, present)
    ddi_e, ddi_g = stats.ddi()
    return _out(ddi_e, stats.sets.batched), _out(ddi_g, stats.sets.batched)


def evaluate(samples, experts, present=None, device: torch.device | str | None = None) -> dict:
    """Every metric from one `pair_counts` call: keys ged, d_max, d_a, s_c, ci, hm_iou, ddi_e, ddi_g,
    n_samples, n_experts (present experts per scan).

    One scan gives Python floats and ints; a batch gives (B,) tensors (float64; int64 for the counts).
    `device` is where the Gram is computed (default: where `samples` lives). Conventions: `CONVENTIONS`.
    """
    stats = pair_stats(samples, experts, present, device)
    result = stats.all()
    batched = stats.sets.batched
    n_experts = stats.sets.present.sum(dim=1).to(torch.int64)
    n_samples = torch.full((stats.sets.batch,), stats.n, dtype=torch.int64)
    if not batched:
        return {**{k: float(v[0]) for k, v in result.items()},
                "n_samples": int(n_samples[0]), "n_experts": int(n_experts[0])}
    return {**result, "n_samples": n_samples, "n_experts": n_experts}
