"""The step runner: everything between the sampling loop and the network.

The sampling loop (ssb_fast.sampler) knows the bridge, the chunking and the keyed noise; the runner
owns how one step runs on the hardware:

- precision and layout: on CUDA a bfloat16 copy of the network (cast once, not per step under
  autocast) fed channels_last buffers, with `cudnn.benchmark`; elsewhere the float32 network as is;
- fixed shapes: with `torch.compile` (dynamic=False) every new row count is a fresh compile, so the
  runner pads requests to the row counts it already has (`padded_rows`): a run sees the chunk's row
  count and one small bucket for the shared first step;
- the step itself, U-Net + fused `cfg_step`, on ping-pong `[x_t | scan]` buffers that stay float32
  (the state x_t never drops to the network's precision), optionally captured as one CUDA graph per
  buffer direction whose time input, coefficients and noise step are read from device tensors;
- warm-up (compile, cudnn autotuning, graph capture) runs once per shape and is timed apart, so
  throughput can be counted over the steady state.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MIN_BUCKET = 8  # the smallest padded row count; tiny first steps share it
CPU_MICRO_BATCH = 32  # rows per network call on the CPU (cache-sized activations)
KEPT_CHUNK_SHAPES = 4  # buffer sets (and graphs) kept for reuse; eager runs may see many chunk sizes


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA out-of-memory error, also in the forms graph capture and the allocator raise it."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


@contextlib.contextmanager
def allowed_sync(device: torch.device):
    """A place where the sampler synchronises on purpose (chunk boundaries, warm-up): under
    `torch.cuda.set_sync_debug_mode("error")` every other host sync raises."""
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class StepSchedule:
    """What every step of a run shares: the step list, its network time inputs (K,) and posterior
    coefficients (K-1, 4) on the device, guidance, and how many halves (1 or 2) a step evaluates."""

    steps: tuple[int, ...]
    t_in: torch.Tensor
    coefs: torch.Tensor
    steps_dev: torch.Tensor
    guidance: float
    halves: int
    ot_ode: bool
    clamp: bool


class _ChunkBuffers:
    """Static buffers of one chunk shape: the two `[x_t | scan]` inputs (rows, mask_ch + scan_ch, H, W)
    float32, the row labels, the masks' noise keys and x0̂, the step index graphs read, and the graphs."""

    def __init__(self, rows: int, batch: int, mask_channels: int, scan_shape: tuple[int, int, int],
                 device: torch.device, channels_last: bool):
        chans, height, width = scan_shape
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.bufs = [torch.zeros(rows, mask_channels + chans, height, width, device=device).contiguous(
            memory_format=fmt) for _ in range(2)]
        self.labels = torch.zeros(rows, dtype=torch.int64, device=device)
        self.seeds = torch.zeros(batch, dtype=torch.int64, device=device)
        self.x0 = torch.zeros(batch, mask_channels, height, width, device=device)
        self.k_index = torch.zeros(1, dtype=torch.int64, device=device)
        self.graphs: list[torch.cuda.CUDAGraph] | None = None
        self.schedule: StepSchedule | None = None  # the graphs read its tables
        self.current = 0  # which of bufs holds x_n


class StepRunner:
    """Evaluate the network for the sampler, at the precision, layout and shapes the hardware wants.

    net: callable (x (R, mask_ch + scan_ch, H, W), t (R,), label (R,)) -> (R, mask_ch, H, W).
    precision: "bfloat16" or "float32"; default bfloat16 on CUDA, float32 elsewhere. A module is
        copied before it is cast, so the caller's weights are left alone.
    channels_last: default on CUDA only.
    compile: torch.compile the network with fixed shapes (True for Inductor, or a backend name).
    cuda_graphs: capture each step (network + cfg_step) as a CUDA graph; CUDA only.
    micro_batch: rows per network call. Default 32 on the CPU without compile, where a U-Net call on fewer
        rows keeps its activations in cache (the tiny preset at 64 px ran 1.8x faster per row in calls of 32
        rows than of 128), and the whole chunk at once on CUDA or when compiled (fixed shapes). Each row's
        output does not depend on the others.
    """

    def __init__(self, net, device: torch.device | str, *, precision: str | None = None,
                 channels_last: bool | None = None, compile: bool | str = False, cuda_graphs: bool = False,
                 mask_channels: int = 1, micro_batch: int | None = None):
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        precision = precision or ("bfloat16" if on_cuda else "float32")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
        if cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs needs a CUDA device; the device is {self.device}")
        self.precision, self.dtype = precision, PRECISIONS[precision]
        self.channels_last = on_cuda if channels_last is None else bool(channels_last)
        self.cuda_graphs = bool(cuda_graphs)
        self.mask_channels = int(mask_channels)
        if micro_batch is not None and (isinstance(micro_batch, bool) or int(micro_batch) < 1):
            raise ValueError(f"micro_batch must be a positive int; got {micro_batch!r}")
        # Compiled runs see whole chunks: micro-batches of a padded chunk could add row counts to compile.
        self.micro_batch = (int(micro_batch) if micro_batch is not None
                            else None if on_cuda or compile or cuda_graphs else CPU_MICRO_BATCH)
        self.module = net if isinstance(net, nn.Module) else None
        if self.module is not None:
            params = list(self.module.parameters())
            needs_cast = any(p.dtype != self.dtype for p in params if p.is_floating_point())
            if needs_cast or self.channels_last:
                self.module = copy.deepcopy(self.module).to(dtype=self.dtype)
                if self.channels_last:
                    self.module = self.module.to(memory_format=torch.channels_last)
                self.module.eval()
            net = self.module
        if on_cuda and not (torch.are_deterministic_algorithms_enabled() or torch.backends.cudnn.deterministic):
            torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each convolution once
        self.compiled = bool(compile)
        if self.compiled:
            backend = compile if isinstance(compile, str) else "inductor"
            net = torch.compile(net, dynamic=False, backend=backend)
        self.net = net
        self.fixed_shapes = self.compiled or self.cuda_graphs
        self.warms_up = self.fixed_shapes or on_cuda
        self.shapes: list[int] = []  # row counts the network has been (or will be) called with
        self.warmup_seconds = 0.0
        self._warm: set[tuple] = set()
        self._chunks: dict[tuple, _ChunkBuffers] = {}
        self._chunk: _ChunkBuffers | None = None
        self._schedule: StepSchedule | None = None

    # ---- mode and shapes ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def inference(self):
        """Eval mode (no live dropout) and no autograd for the duration; the module's mode is restored."""
        module = self.module
        was_training = module.training if module is not None else False
        if module is not None:
            module.eval()
        try:
            with torch.inference_mode():
                yield self
        finally:
            if module is not None and was_training:
                module.train()

    def padded_rows(self, rows: int, cap: int | None = None) -> int:
        """The row count at which to evaluate `rows` rows (a chunk). Without fixed shapes, `rows` itself;
        with them, the smallest row count already in use that holds them, else a new one: the next power
        of two (at least MIN_BUCKET), capped at `cap`."""
        if not self.fixed_shapes or rows <= 0:
            return rows
        fits = [s for s in self.shapes if s >= rows]
        return min(fits) if fits else self._add_shape(rows, cap)

    def bucket(self, rows: int, cap: int | None = None) -> int:
        """A small row count for `rows` rows (the shared first step): an existing row count no larger than
        the next power of two, else that power of two (at least MIN_BUCKET, capped at `cap`)."""
        if not self.fixed_shapes or rows <= 0:
            return rows
        limit = max(_next_power_of_two(rows), MIN_BUCKET)
        fits = [s for s in self.shapes if rows <= s <= limit]
        return min(fits) if fits else self._add_shape(rows, cap)

    def _add_shape(self, rows: int, cap: int | None) -> int:
        new = max(_next_power_of_two(rows), MIN_BUCKET)
        if cap is not None:
            new = max(rows, min(new, cap))
        if new not in self.shapes:
            self.shapes.append(new)
        return new

    # ---- the network ----------------------------------------------------------------------------------
    def new_input(self, rows: int, scan_rows: torch.Tensor) -> torch.Tensor:
        """A (rows, mask_ch + scan_ch, H, W) float32 network input with x_t = x1 and the scan channels
        filled from `scan_rows` (repeated to `rows`)."""
        _, chans, height, width = scan_rows.shape
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        buf = torch.empty(rows, self.mask_channels + chans, height, width, device=self.device,
                          memory_format=fmt)
        self._fill(buf, scan_rows)
        return buf

    def _fill(self, buf: torch.Tensor, scan_rows: torch.Tensor) -> None:
        reps = buf.shape[0] // scan_rows.shape[0]
        mc = self.mask_channels
        buf[:, mc:] = scan_rows.repeat(reps, 1, 1, 1)
        buf[:, :mc] = buf[:, mc : 2 * mc]  # the bridge starts at x = x1, the scan's first channel

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The network on float32 input x, cast to the runner's precision (the state stays float32), in
        calls of at most `micro_batch` rows."""
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        rows, mb = x.shape[0], self.micro_batch
        if mb is None or rows <= mb:
            return self.net(x, t, label)
        return torch.cat([self.net(x[i:i + mb], t[i:i + mb], label[i:i + mb]) for i in range(0, rows, mb)])

    def warm(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> None:
        """Compile and autotune for x's shape with one network call, timed as warm-up, once per shape."""
        key = (tuple(x.shape), x.dtype)
        if not self.warms_up or key in self._warm:
            return
        with allowed_sync(self.device):
            self._synchronize()
            start = time.perf_counter()
            self.forward(x, t, label)
            self._synchronize()
            self.warmup_seconds += time.perf_counter() - start
        self._warm.add(key)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- the step --------------------------------------------------------------------------------------
    def begin_chunk(self, schedule: StepSchedule, scan_rows: torch.Tensor, row_labels: torch.Tensor,
                    seeds: torch.Tensor) -> None:
        """Load a chunk of B = len(seeds) masks: scans (B, C, H, W) on the device, the network's row labels
        (halves * B,) and the masks' noise keys (B,). Warms up (and captures) a new shape first."""
        batch = seeds.shape[0]
        rows = schedule.halves * batch
        key = (rows, tuple(scan_rows.shape[1:]))
        chunk = self._chunks.pop(key, None)
        fresh = chunk is None or chunk.schedule is not schedule
        if fresh:
            chunk = _ChunkBuffers(rows, batch, self.mask_channels, tuple(scan_rows.shape[1:]), self.device,
                                  self.channels_last)
        for buf in chunk.bufs:
            self._fill(buf, scan_rows)
        chunk.labels.copy_(row_labels)
        chunk.seeds.copy_(seeds)
        chunk.current = 0
        self._chunk, self._schedule = chunk, schedule
        if fresh:
            self.warm(chunk.bufs[0], schedule.t_in[-1].expand(rows), chunk.labels)
            if self.cuda_graphs:
                self._capture(chunk, schedule, scan_rows)
            chunk.schedule = schedule
        self._chunks[key] = chunk  # most recently used last
        while len(self._chunks) > KEPT_CHUNK_SHAPES:
            self._chunks.pop(next(iter(self._chunks)))

    @property
    def x0(self) -> torch.Tensor:
        """x0̂ (B, mask_ch, H, W) of the chunk, written by the last step."""
        return self._chunk.x0

    def step(self, k: int, net_out: torch.Tensor | None = None) -> int:
        """Step the chunk from steps[k] to steps[k-1]; `net_out` is the network output at steps[k] when the
        caller has it (the shared first step). Returns the network rows evaluated."""
        chunk, sched = self._chunk, self._schedule
        rows = chunk.labels.shape[0]
        if net_out is None and chunk.graphs is not None and k > 1:
            chunk.k_index.fill_(k)
            chunk.graphs[chunk.current].replay()
            chunk.current = 1 - chunk.current
            return rows
        cur, nxt = chunk.bufs[chunk.current], chunk.bufs[1 - chunk.current]
        evaluated = 0
        if net_out is None:
            net_out = self.forward(cur, sched.t_in[k].expand(rows), chunk.labels)
            evaluated = rows
        batch = chunk.seeds.shape[0]
        prev = sched.steps[k - 1]
        torch.ops.ssb_fast.cfg_step(
            cur[:batch, : self.mask_channels], net_out, sched.coefs[k - 1].expand(batch, 4), chunk.seeds,
            sched.guidance, sched.steps[k], not sched.ot_ode and prev > 0, sched.clamp, nxt,
            chunk.x0 if k == 1 else None,
        )
        chunk.current = 1 - chunk.current
        return evaluated

    def _graph_step(self, chunk: _ChunkBuffers, sched: StepSchedule, source: int) -> None:
        """A middle step (noise on, no x0̂) with everything step-dependent read from chunk.k_index."""
        rows, batch = chunk.labels.shape[0], chunk.seeds.shape[0]
        cur, nxt = chunk.bufs[source], chunk.bufs[1 - source]
        t = sched.t_in.index_select(0, chunk.k_index).expand(rows)
        coefs = sched.coefs.index_select(0, chunk.k_index - 1).expand(batch, 4)
        step = sched.steps_dev.index_select(0, chunk.k_index)
        net_out = self.forward(cur, t, chunk.labels)
        torch.ops.ssb_fast.cfg_step(
            cur[:batch, : self.mask_channels], net_out, coefs, chunk.seeds, sched.guidance, max(sched.steps),
            not sched.ot_ode, sched.clamp, nxt, None, step,
        )

    def _capture(self, chunk: _ChunkBuffers, sched: StepSchedule, scan_rows: torch.Tensor) -> None:
        """One CUDA graph per buffer direction, captured after warm-up on a side stream; timed as warm-up.
        Capturing runs the step on the chunk's buffers, so x_t = x1 is restored afterwards."""
        with allowed_sync(self.device):
            self._synchronize()
            start = time.perf_counter()
            chunk.k_index.fill_(len(sched.steps) - 1)
            graphs = []
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for source in (0, 1):
                    self._graph_step(chunk, sched, source)
            torch.cuda.current_stream(self.device).wait_stream(side)
            for source in (0, 1):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._graph_step(chunk, sched, source)
                graphs.append(graph)
            for buf in chunk.bufs:
                self._fill(buf, scan_rows)
            self._synchronize()
            self.warmup_seconds += time.perf_counter() - start
        chunk.graphs = graphs

    def release(self) -> None:
        """Drop the chunk buffers and graphs (after an out-of-memory error, before retrying smaller)."""
        self._chunks.clear()
        self._chunk = None
