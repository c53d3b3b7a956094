"""The one sampling loop of ssb-fast: N masks per scan from the bridge, with classifier-free guidance.

Per step, one network call evaluates the chunk's rows laid out in a preallocated buffer `[x_t | scan]`
and the fused `cfg_step` op turns its output into x_{n-1}, written straight into the x_t channels of
the other (ping-pong) buffer. With 0 < w != 1 a step evaluates 2B rows (rows [0, B) carry each mask's
expert label, rows [B, 2B) the null label); at w = 1 only the B conditional rows and at w = 0 only the
B null-label rows, since u + w (c - u) then needs one half. The first step is shared: every mask of a
scan starts at x = x1, so its network output depends only on (scan, label) and is evaluated once per
distinct pair.

Noise is keyed per mask (run seed, case id, mask index), so mask i of a scan is the same whatever
chunk, batch size or process computed it. The loop knows nothing about the network class: a
`StepRunner` (ssb_fast.step_runner) owns precision, layout, compilation and CUDA graphs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ssb_fast.bridge import Bridge
from ssb_fast.kernels import noise_seed, noise_seeds
from ssb_fast.step_runner import StepRunner, StepSchedule, allowed_sync, is_out_of_memory

LABEL_MODES = ("cycle", "random")


@dataclass
class SampleResult:
    """Masks (S, N, H, W) uint8 with x0̂ > 0, the expert label each mask was drawn with (S, N), optional
    soft x0̂ in [-1, 1] (S, N, H, W) float32, and counters of the work done."""

    masks: torch.Tensor
    labels: torch.Tensor
    soft: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)


def expert_labels(case_ids: Sequence[str], n_samples: int, n_labels: int, mode: str = "cycle",
                  seed: int = 0) -> torch.Tensor:
    """(S, N) label per mask: `cycle` gives mask i the expert i mod M (experts covered evenly); `random`
    draws it from a key of (seed, case id, i), so it too is independent of chunking."""
    if mode not in LABEL_MODES:
        raise ValueError(f"labels must be one of {', '.join(LABEL_MODES)}; got {mode!r}")
    if n_labels < 1:
        raise ValueError(f"the model must know at least one expert label; got n_labels={n_labels}")
    if mode == "cycle":
        return (torch.arange(n_samples) % n_labels).repeat(len(case_ids), 1)
    rows = [[noise_seed(seed, f"{cid}\x1elabel", i) % n_labels for i in range(n_samples)] for cid in case_ids]
    return torch.tensor(rows, dtype=torch.int64).view(len(case_ids), n_samples)


def first_step_noise_scaled(coefs: torch.Tensor, scale: float) -> torch.Tensor:
    """The (K, 4) sampling coefficients with the first step's noise standard deviation (the last row's
    `std`, the move down from x_T = the scan) multiplied by `scale`.

    Every mask of a scan starts at the same x_T, so whether a region is marked at all is decided by the
    noise of the first step. With a handful of steps its posterior std is too small for a region of
    hundreds of pixels (the region's mean noise falls as 1/sqrt(area)) and the sampler draws the more
    likely outcome nearly every time; `ssb-fast bench bridge-odds --first-step-noise` measures the share a
    Bayes-optimal network's samples mark at each scale."""
    scaled = coefs.clone()
    scaled[-1, 3] = scaled[-1, 3] * scale
    return scaled


class Sampler:
    """Turn S scans into N masks each with `nfe` network evaluations per mask.

    net: callable (x (R, mask_ch + scan_ch, H, W), t (R,) float, label (R,) int64) -> (R, mask_ch, H, W);
        a `UNet` qualifies, and its `config.n_labels` / `null_label` are read when not given. A module is
        put in eval mode while sampling (dropout is never live) and restored afterwards.
    guidance: w in out = u + w (c - u); 1 = conditional only, 0 = unconditional (both evaluate B rows;
        `guidance_fast_path=False` forces 2B rows there too, for comparison).
    max_batch: masks per chunk (B). Default 256 on CUDA, 32 on CPU. On CUDA out-of-memory the chunk is
        halved and retried; finished chunks are kept, and later calls keep the smaller size.
    precision / channels_last / compile / cuda_graphs / micro_batch: see `StepRunner` (bfloat16 weights and
        channels_last by default on CUDA only; compile pads every call to at most two row counts; on the
        CPU the network runs 32 rows per call).
    first_step_noise: multiplies the standard deviation of the noise the first step adds (1 = I2SB's
        posterior); see `first_step_noise_scaled`.
    """

    def __init__(self, net: Callable, bridge: Bridge, *, nfe: int = 20, guidance: float = 1.0,
                 n_labels: int | None = None, null_label: int | None = None, mask_channels: int = 1,
                 ot_ode: bool = False, clamp: bool = True, max_batch: int | None = None, seed: int = 0,
                 labels: str = "cycle", share_first_step: bool = True, device: torch.device | str | None = None,
                 precision: str | None = None, channels_last: bool | None = None, compile: bool | str = False,
                 cuda_graphs: bool = False, guidance_fast_path: bool = True, micro_batch: int | None = None,
                 first_step_noise: float = 1.0):
        config = getattr(net, "config", None)
        if n_labels is None:  # the null label is index n_labels, so either attribute tells the count
            n_labels = getattr(config, "n_labels", getattr(net, "null_label", 0))
        self.n_labels = int(n_labels)
        self.null_label = int(null_label if null_label is not None else getattr(net, "null_label", self.n_labels))
        self.mask_channels = int(getattr(config, "mask_channels", mask_channels))
        self.scan_channels = getattr(config, "scan_channels", None)
        if self.mask_channels != 1:
            raise ValueError(f"the sampler draws binary masks from one x_t channel; got mask_channels="
                             f"{self.mask_channels}")
        if labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {', '.join(LABEL_MODES)}; got {labels!r}")
        self.steps = bridge.step_indices(nfe)
        if isinstance(first_step_noise, bool) or not 0.0 < float(first_step_noise) < float("inf"):
            raise ValueError(f"first_step_noise must be a positive finite number; got {first_step_noise!r}")
        self.first_step_noise = float(first_step_noise)
        if max_batch is not None and (isinstance(max_batch, bool) or int(max_batch) < 1):
            raise ValueError(f"max_batch must be a positive int; got {max_batch!r}")
        if device is None:
            params = getattr(net, "parameters", None)
            first = next(iter(params()), None) if callable(params) else None
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.bridge, self.nfe, self.guidance = bridge, nfe, float(guidance)
        self.ot_ode, self.clamp, self.seed, self.label_mode = ot_ode, clamp, int(seed), labels
        self.share_first_step = share_first_step
        self.max_batch = int(max_batch) if max_batch is not None else (256 if self.device.type == "cuda" else 32)
        # Rows per mask and step: one half when guidance needs only the conditional (w = 1) or only the
        # unconditional (w = 0) output, both halves otherwise.
        self.halves = 1 if guidance_fast_path and self.guidance in (0.0, 1.0) else 2
        self.runner = StepRunner(net, self.device, precision=precision, channels_last=channels_last,
                                 compile=compile, cuda_graphs=cuda_graphs, mask_channels=self.mask_channels,
                                 micro_batch=micro_batch)
        # Per-step tables on the device, built once: network time inputs and posterior coefficients.
        self.schedule = StepSchedule(
            steps=tuple(self.steps), t_in=bridge.noise_levels[self.steps].to(self.device),
            coefs=first_step_noise_scaled(bridge.sampling_coefs(self.steps), self.first_step_noise).to(self.device),
            steps_dev=torch.tensor(self.steps, dtype=torch.int64, device=self.device),
            guidance=self.guidance, halves=self.halves, ot_ode=bool(ot_ode), clamp=bool(clamp),
        )

    # ---- public API ------------------------------------------------------------------------------
    def sample(self, scans: torch.Tensor, n_samples: int, case_ids: Sequence[str] | None = None,
               labels: torch.Tensor | None = None, return_soft: bool = False,
               on_chunk: Callable[[int, int], None] | None = None) -> SampleResult:
        """Draw `n_samples` masks for each of the S scans (S, C, H, W) in [-1, 1].

        case_ids key the noise (default "0", "1", ...); labels (S, N) or (N,) override the expert labels.
        on_chunk(done, total) is called after every finished chunk. The stats hold the warm-up (compile,
        autotuning, graph capture) in `warmup_seconds` and the steady state in `seconds`/`masks_per_s`.
        """
        scans = self._check_scans(scans)
        n_scans, _, height, width = scans.shape
        if isinstance(n_samples, bool) or int(n_samples) < 0:
            raise ValueError(f"n_samples must be a non-negative int; got {n_samples!r}")
        n_samples = int(n_samples)
        case_ids = [str(i) for i in range(n_scans)] if case_ids is None else [str(c) for c in case_ids]
        if len(case_ids) != n_scans:
            raise ValueError(f"case_ids has {len(case_ids)} entries for {n_scans} scans")
        labels = self._resolve_labels(labels, case_ids, n_samples)

        masks = torch.zeros(n_scans, n_samples, height, width, dtype=torch.uint8)
        soft = torch.zeros(n_scans, n_samples, height, width) if return_soft else None
        stats = {"masks": n_scans * n_samples, "nfe": self.nfe, "chunks": 0, "network_rows": 0, "padding_rows": 0,
                 "rows_per_step": self.halves, "oom_retries": 0, "max_batch": self.max_batch,
                 "precision": self.runner.precision}
        total, done = n_scans * n_samples, 0
        warmup_before = self.runner.warmup_seconds
        start = time.perf_counter()
        with self.runner.inference():
            scans_dev = scans.to(self.device, torch.float32)
            first_bucket = None
            while done < total:
                batch = self.max_batch
                b = min(batch, total - done)
                flat = torch.arange(done, done + b)
                scan_idx, mask_idx = flat // n_samples, flat % n_samples
                failed = False
                try:
                    if first_bucket is None and self.share_first_step:
                        first_bucket = self._first_step_bucket(labels, n_samples, total, done)
                    with allowed_sync(self.device):
                        seeds = noise_seeds(self.seed, [case_ids[s] for s in scan_idx.tolist()], mask_idx.tolist(),
                                            device=self.device)
                    x0, rows, padding = self._run_chunk(scans_dev, scan_idx, labels[scan_idx, mask_idx], seeds,
                                                        first_bucket)
                    with allowed_sync(self.device):  # the one sync of a chunk: its masks to the host
                        x0 = x0[:, 0].float().cpu()
                except Exception as err:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
                    if not is_out_of_memory(err) or b == 1:
                        raise
                    failed = True
                if failed:  # outside the except block, so that the failed chunk's tensors are freed first
                    self.max_batch = max(1, b // 2)
                    stats["oom_retries"] += 1
                    first_bucket = None
                    self.runner.release()
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                masks[scan_idx, mask_idx] = (x0 > 0).to(torch.uint8)
                if soft is not None:
                    soft[scan_idx, mask_idx] = x0
                done += b
                stats["chunks"] += 1
                stats["network_rows"] += rows
                stats["padding_rows"] += padding
                if on_chunk is not None:
                    on_chunk(done, total)
        elapsed = time.perf_counter() - start
        warmup = self.runner.warmup_seconds - warmup_before
        stats["warmup_seconds"] = warmup
        stats["seconds"] = max(0.0, elapsed - warmup)
        stats["masks_per_s"] = total / stats["seconds"] if stats["seconds"] > 0 else float("nan")
        stats["final_batch"] = self.max_batch
        stats["shapes"] = sorted(self.runner.shapes)
        return SampleResult(masks=masks, labels=labels, soft=soft, stats=stats)

    # ---- internals ---------------------------------------------------------------------------------
    def _check_scans(self, scans: torch.Tensor) -> torch.Tensor:
        if not isinstance(scans, torch.Tensor):
            raise TypeError(f"scans must be a torch.Tensor (S, C, H, W); got {type(scans).__name__}")
        if scans.dim() != 4:
            raise ValueError(f"scans must be (S, C, H, W); got shape {tuple(scans.shape)}")
        if not scans.is_floating_point():
            raise TypeError(f"scans must be floating point in [-1, 1]; got {scans.dtype}")
        if self.scan_channels is not None and scans.shape[1] != self.scan_channels:
            raise ValueError(f"the model expects {self.scan_channels} scan channel(s); got {scans.shape[1]}")
        if scans.numel() and not torch.isfinite(scans).all():
            raise ValueError("scans contain NaN or Inf")
        return scans

    def _resolve_labels(self, labels, case_ids, n_samples) -> torch.Tensor:
        if labels is None:
            return expert_labels(case_ids, n_samples, self.n_labels, self.label_mode, self.seed)
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.dim() == 1:
            labels = labels.expand(len(case_ids), -1)
        if tuple(labels.shape) != (len(case_ids), n_samples):
            raise ValueError(f"labels must be (N,) or (S, N) = ({len(case_ids)}, {n_samples}); "
                             f"got {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.n_labels):
            raise ValueError(f"labels must lie in [0, {self.n_labels}) (the experts the model knows)")
        return labels

    def _row_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The network's label per row: expert labels, then the null label (2B); or one half (B)."""
        null = torch.full_like(labels, self.null_label)
        if self.halves == 2:
            return torch.cat([labels, null])
        return labels if self.guidance == 1.0 else null

    def _first_step_keys(self, scan_idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One key per network row of the first step: (scan, label) pairs, whose output is shared."""
        return scan_idx.repeat(self.halves) * (self.null_label + 1) + self._row_labels(labels)

    def _chunk_rows(self, b: int) -> int:
        """Network rows of a chunk of b masks: halves * b, padded to a compiled row count when shapes are fixed."""
        return self.runner.padded_rows(self.halves * b, cap=self.halves * self.max_batch)

    def _first_step_bucket(self, labels: torch.Tensor, n_samples: int, total: int, done: int) -> int:
        """The padded row count of the shared first step, from the chunk of this call with the most
        distinct (scan, label) pairs, so that one bucket serves every chunk."""
        most = 0
        for lo in range(done, total, self.max_batch):
            flat = torch.arange(lo, min(lo + self.max_batch, total))
            keys = self._first_step_keys(flat // n_samples, labels[flat // n_samples, flat % n_samples])
            most = max(most, int(torch.unique(keys).numel()))
        return self.runner.bucket(most, cap=self._chunk_rows(min(self.max_batch, total - done)))

    def _shared_first_output(self, scans_dev, scan_idx, labels, bucket) -> tuple[torch.Tensor, int, int]:
        """Network output at the first step for every row, evaluated once per distinct (scan, label).
        Returns it with the rows evaluated and how many of those were padding."""
        width = self.null_label + 1
        uniq, inverse = torch.unique(self._first_step_keys(scan_idx, labels), return_inverse=True)
        rows = max(len(uniq), self.runner.padded_rows(len(uniq), cap=bucket))
        pad = rows - len(uniq)
        u_scan = torch.cat([uniq // width, (uniq[:1] // width).expand(pad)])
        u_label = torch.cat([uniq % width, (uniq[:1] % width).expand(pad)])
        with allowed_sync(self.device):
            u_scan, u_label, inverse = (v.to(self.device) for v in (u_scan, u_label, inverse))
        x = self.runner.new_input(rows, scans_dev[u_scan])
        t = self.schedule.t_in[-1].expand(rows)
        self.runner.warm(x, t, u_label)
        out = self.runner.forward(x, t, u_label)
        return out[inverse], rows, pad

    def _run_chunk(self, scans_dev, scan_idx, labels, seeds, first_bucket) -> tuple[torch.Tensor, int, int]:
        """Sample one chunk of b masks; returns x0̂ (b, mask_ch, H, W), the network rows evaluated and how
        many of them were padding (rows added to reach a compiled shape)."""
        b = scan_idx.shape[0]
        bp = self._chunk_rows(b) // self.halves
        if bp > b:  # pad with copies of the first mask; their results are dropped
            scan_idx = torch.cat([scan_idx, scan_idx[:1].expand(bp - b)])
            labels = torch.cat([labels, labels[:1].expand(bp - b)])
            seeds = torch.cat([seeds, seeds[:1].expand(bp - b)])
        with allowed_sync(self.device):
            row_labels = self._row_labels(labels).to(self.device)
            scan_rows = scans_dev[scan_idx.to(self.device)]
        self.runner.begin_chunk(self.schedule, scan_rows, row_labels, seeds)
        evaluated, padding = 0, 0
        top = len(self.steps) - 1
        for k in range(top, 0, -1):
            first_out = None
            if k == top and self.share_first_step:
                first_out, first_rows, padding = self._shared_first_output(scans_dev, scan_idx, labels, first_bucket)
                evaluated += first_rows
            rows = self.runner.step(k, first_out)
            evaluated += rows
            padding += rows - rows * b // bp
        return self.runner.x0[:b], evaluated, padding
