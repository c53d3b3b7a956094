"""The one sampling loop of ssb-fast: N masks per scan from the bridge, with classifier-free guidance.

Per step, one network call evaluates a 2B batch laid out in a preallocated buffer `[x_t | scan]`
(rows [0, B) carry each mask's expert label, rows [B, 2B) the null label), and the fused `cfg_step`
op turns its output into x_{n-1}, written straight into the x_t channels of the other (ping-pong)
buffer. The first step is shared: every mask of a scan starts at x = x1, so its network output
depends only on (scan, label) and is evaluated once per distinct pair.

Noise is keyed per mask (run seed, case id, mask index), so mask i of a scan is the same whatever
chunk, batch size or process computed it. The sampler knows nothing about the network class: it
takes a callable `net(x, t, label)`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ssb_fast.bridge import Bridge
from ssb_fast.kernels import noise_seed, noise_seeds

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


class Sampler:
    """Turn S scans into N masks each with `nfe` network evaluations per mask.

    net: callable (x (R, mask_ch + scan_ch, H, W), t (R,) float, label (R,) int64) -> (R, mask_ch, H, W);
        a `UNet` qualifies, and its `config.n_labels` / `null_label` are read when not given.
    guidance: w in out = u + w (c - u); 1 = conditional only, 0 = unconditional.
    max_batch: masks per chunk (B; the network sees 2B rows). Default 256 on CUDA, 32 on CPU. On CUDA
        out-of-memory the chunk is halved and retried; finished chunks are kept.
    amp / channels_last: bf16 autocast and channels_last buffers, on by default on CUDA only.
    compile / cuda_graphs: torch.compile the network (mode "reduce-overhead" captures CUDA graphs).
    """

    def __init__(self, net: Callable, bridge: Bridge, *, nfe: int = 20, guidance: float = 1.0,
                 n_labels: int | None = None, null_label: int | None = None, mask_channels: int = 1,
                 ot_ode: bool = False, clamp: bool = True, max_batch: int | None = None, seed: int = 0,
                 labels: str = "cycle", share_first_step: bool = True, device: torch.device | str | None = None,
                 amp: bool | None = None, channels_last: bool | None = None, compile: bool = False,
                 cuda_graphs: bool = False):
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
        if max_batch is not None and (isinstance(max_batch, bool) or int(max_batch) < 1):
            raise ValueError(f"max_batch must be a positive int; got {max_batch!r}")
        if device is None:
            params = getattr(net, "parameters", None)
            first = next(iter(params()), None) if callable(params) else None
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.bridge, self.nfe, self.guidance = bridge, nfe, float(guidance)
        self.ot_ode, self.clamp, self.seed, self.label_mode = ot_ode, clamp, int(seed), labels
        self.share_first_step = share_first_step
        self.max_batch = int(max_batch) if max_batch is not None else (256 if on_cuda else 32)
        self.amp = on_cuda if amp is None else bool(amp)
        self.channels_last = on_cuda if channels_last is None else bool(channels_last)
        self.net = net
        if compile or cuda_graphs:
            self.net = torch.compile(net, mode="reduce-overhead" if cuda_graphs else None, dynamic=False)
        # Per-step tables on the device, built once: network time inputs and posterior coefficients.
        self._t_in = bridge.noise_levels[self.steps].to(self.device)
        self._coefs = bridge.sampling_coefs(self.steps, device=self.device)

    # ---- public API ------------------------------------------------------------------------------
    @torch.inference_mode()
    def sample(self, scans: torch.Tensor, n_samples: int, case_ids: Sequence[str] | None = None,
               labels: torch.Tensor | None = None, return_soft: bool = False,
               on_chunk: Callable[[int, int], None] | None = None) -> SampleResult:
        """Draw `n_samples` masks for each of the S scans (S, C, H, W) in [-1, 1].

        case_ids key the noise (default "0", "1", ...); labels (S, N) or (N,) override the expert labels.
        on_chunk(done, total) is called after every finished chunk.
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
        stats = {"masks": n_scans * n_samples, "nfe": self.nfe, "chunks": 0, "network_rows": 0,
                 "oom_retries": 0, "max_batch": self.max_batch}
        scans_dev = scans.to(self.device, torch.float32)
        total, done, batch = n_scans * n_samples, 0, self.max_batch
        start = time.perf_counter()
        while done < total:
            b = min(batch, total - done)
            flat = torch.arange(done, done + b)
            scan_idx, mask_idx = flat // n_samples, flat % n_samples
            seeds = noise_seeds(self.seed, [case_ids[s] for s in scan_idx.tolist()], mask_idx.tolist(),
                                device=self.device)
            try:
                x0, rows = self._run_chunk(scans_dev, scan_idx, labels[scan_idx, mask_idx], seeds)
            except torch.cuda.OutOfMemoryError:
                if b == 1:
                    raise
                batch = b // 2
                stats["oom_retries"] += 1
                torch.cuda.empty_cache()
                continue
            x0 = x0[:, 0].float().cpu()
            masks[scan_idx, mask_idx] = (x0 > 0).to(torch.uint8)
            if soft is not None:
                soft[scan_idx, mask_idx] = x0
            done += b
            stats["chunks"] += 1
            stats["network_rows"] += rows
            if on_chunk is not None:
                on_chunk(done, total)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats["seconds"] = time.perf_counter() - start
        stats["masks_per_s"] = total / stats["seconds"] if stats["seconds"] > 0 else float("nan")
        stats["final_batch"] = batch
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

    def _new_buffer(self, rows: int, scan_rows: torch.Tensor) -> torch.Tensor:
        """A (rows, mask_ch + scan_ch, H, W) float32 network input with the scan channels filled."""
        _, chans, height, width = scan_rows.shape
        buf = torch.empty(rows, self.mask_channels + chans, height, width, device=self.device)
        if self.channels_last:
            buf = buf.contiguous(memory_format=torch.channels_last)
        reps = rows // scan_rows.shape[0]
        buf[:, self.mask_channels:] = scan_rows.repeat(reps, 1, 1, 1)
        return buf

    def _call_net(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.net(x, t, label)

    def _shared_first_output(self, scans_dev, scan_idx, labels) -> tuple[torch.Tensor, int]:
        """Network output at the first step for the 2B rows, evaluated once per distinct (scan, label)."""
        width = self.null_label + 1
        keys = torch.cat([scan_idx * width + labels, scan_idx * width + self.null_label])
        uniq, inverse = torch.unique(keys, return_inverse=True)
        u_scan, u_label = uniq // width, uniq % width
        buf = self._new_buffer(len(uniq), scans_dev[u_scan.to(self.device)])
        mc = self.mask_channels
        buf[:, :mc] = buf[:, mc : 2 * mc]  # x = x1, the scan's first channel
        out = self._call_net(buf, self._t_in[-1].expand(len(uniq)), u_label.to(self.device))
        return out[inverse.to(self.device)], len(uniq)

    def _run_chunk(self, scans_dev, scan_idx, labels, seeds) -> tuple[torch.Tensor, int]:
        """Sample one chunk of B masks; returns x0̂ (B, mask_ch, H, W) and the network rows evaluated."""
        batch, mc = scan_idx.shape[0], self.mask_channels
        scan_rows = scans_dev[scan_idx.to(self.device)]
        cur = self._new_buffer(2 * batch, scan_rows)
        nxt = self._new_buffer(2 * batch, scan_rows)
        x1 = scan_rows[:, :mc]  # the bridge starts at the scan's first channel
        cur[:batch, :mc] = x1
        cur[batch:, :mc] = x1
        labels_dev = labels.to(self.device)
        labels2 = torch.cat([labels_dev, torch.full_like(labels_dev, self.null_label)])
        x0 = torch.empty(batch, mc, *scan_rows.shape[2:], device=self.device)
        rows = 0
        for k in range(len(self.steps) - 1, 0, -1):
            step, prev = self.steps[k], self.steps[k - 1]
            if k == len(self.steps) - 1 and self.share_first_step:
                out, r = self._shared_first_output(scans_dev, scan_idx, labels)
            else:
                out, r = self._call_net(cur, self._t_in[k].expand(2 * batch), labels2), 2 * batch
            rows += r
            torch.ops.ssb_fast.cfg_step(
                cur[:batch, :mc], out, self._coefs[k - 1].expand(batch, 4), seeds, self.guidance, step,
                not self.ot_ode and prev > 0, self.clamp, nxt, x0 if k == 1 else None,
            )
            cur, nxt = nxt, cur
        return x0, rows
