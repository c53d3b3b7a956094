"""What the GPUs are and what they do, from NVML (nvidia-ml-py), for reports.

`gpu_inventory` lists driver, memory, clocks and power limits; `GpuMonitor` samples utilisation, memory,
power, SM clock and energy while a block of work runs. NVML is read lazily and every failure (no driver,
no library, a virtualised GPU that hides a field) becomes a missing value, never an error: a report
about the machine must not stop on the machine.
"""

from __future__ import annotations

import threading
import time

import torch


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_inventory(nvml=None) -> tuple[list[dict], str | None]:
    """(one dict per GPU, None) or ([], why NVML gave nothing). `nvml` defaults to the pynvml module."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return [], "nvidia-ml-py is not installed"
    try:
        nvml.nvmlInit()
    except Exception as err:  # NVMLError_LibraryNotFound / _DriverNotLoaded on machines without a GPU
        return [], f"NVML unavailable ({_text(err) or type(err).__name__})"
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        gpus = [_describe(nvml, index, driver) for index in range(nvml.nvmlDeviceGetCount())]
        return gpus, None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def _describe(nvml, index: int, driver: str) -> dict:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    return {
        "index": index,
        "name": _text(nvml.nvmlDeviceGetName(handle)),
        "driver": driver,
        "memory_total_gib": _field(lambda: nvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30),
        "memory_used_gib": _field(lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30),
        "sm_clock_max_mhz": _field(lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_SM)),
        "mem_clock_max_mhz": _field(lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_MEM)),
        "power_limit_w": _field(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0),
        "utilization_pct": _field(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
    }


def _field(read):
    try:
        return read()
    except Exception:  # a field this GPU or driver does not report
        return None


# ---------------------------------------------------------------- sampling a GPU while work runs
SAMPLED_FIELDS = ("utilization_pct", "memory_used_gib", "power_w", "sm_clock_mhz")


class GpuMonitor:
    """Samples one GPU's NVML counters on a background thread while a `with` block runs.

        with GpuMonitor(device) as mon:
            work()
        mon.summary()  # mean / p95 / max of utilisation, memory, power and SM clock; energy in joules

    Every `interval_s` (20-50 ms suits NVML, whose utilisation window is itself ~20 ms or more) it reads
    utilisation, memory used, power and SM clock, plus one sample on entry and one on exit. Energy comes
    from the total-energy counter (Volta and later) read on entry and exit, else from the power samples
    integrated over time. The NVML device is the one whose UUID is the torch CUDA device's: NVML numbers
    GPUs physically and ignores CUDA_VISIBLE_DEVICES, so an index can name another GPU. Without a CUDA
    device, NVML or the GPU's consent, the summary is `{"gpu": None, "reason": ...}` and nothing fails.

    `interval_s=None` starts no thread (call `sample()` yourself); `nvml`, `cuda_uuid` and `clock` are for
    tests: a stand-in for the pynvml module, the CUDA device's UUID, and the time source.
    """

    def __init__(self, device: torch.device | str | int | None = None, interval_s: float | None = 0.025,
                 nvml=None, cuda_uuid: str | None = None, clock=time.perf_counter):
        if interval_s is not None and interval_s <= 0:
            raise ValueError(f"interval_s must be positive or None; got {interval_s}")
        self.device = device
        self.interval_s = interval_s
        self.clock = clock
        self._nvml = nvml
        self._cuda_uuid = cuda_uuid
        self._handle = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.gpu: dict | None = None
        self.reason: str | None = "the monitor has not run"
        self.notes: list[str] = []
        self.samples: list[tuple[float, dict]] = []
        self._energy_mj: list[float | None] = [None, None]
        self._t = [None, None]

    # -- lifecycle
    def __enter__(self) -> GpuMonitor:
        self.samples.clear()
        self.notes.clear()
        self.gpu = None
        self._energy_mj = [None, None]
        self._t = [self.clock(), None]
        self.reason = self._open()
        if self.reason is None:
            self._energy_mj[0] = _field(lambda: float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)))
            self.sample()
            if self.interval_s is not None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="ssb-fast-gpu-monitor", daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._handle is not None:
            self.sample()
            self._energy_mj[1] = _field(lambda: float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)))
            self._handle = None
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
        self._t[1] = self.clock()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def _open(self) -> str | None:
        """Initialise NVML and find the device; None when ready, else why there is no GPU to watch."""
        device = _as_device(self.device)
        if device is None or device.type != "cuda":
            return f"device is {device.type if device is not None else 'not given'}: no GPU to monitor"
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                return "nvidia-ml-py is not installed"
            self._nvml = pynvml
        try:
            self._nvml.nvmlInit()
        except Exception as err:
            return f"NVML unavailable ({_text(err) or type(err).__name__})"
        index = device.index if device.index is not None else _current_cuda_index()
        try:
            uuid = self._cuda_uuid if self._cuda_uuid is not None else _torch_cuda_uuid(index)
            self._handle, self.gpu = _find_handle(self._nvml, uuid, index, self.notes)
        except Exception as err:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            return f"no NVML device for cuda:{index} ({_text(err) or type(err).__name__})"
        return None

    # -- reading
    def sample(self) -> None:
        """Read the counters once and keep them with the time of reading."""
        nvml, handle = self._nvml, self._handle
        if handle is None:
            return
        values = {
            "utilization_pct": _field(lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
            "memory_used_gib": _field(lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30),
            "power_w": _field(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),
            "sm_clock_mhz": _field(lambda: float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))),
        }
        self.samples.append((self.clock(), values))

    def summary(self) -> dict:
        """Mean / p95 / max of each sampled field, and the energy over the block in joules."""
        if self.gpu is None or self.reason is not None:
            return {"gpu": None, "reason": self.reason or "no GPU was monitored"}
        start, stop = self._t
        duration = (stop if stop is not None else self.clock()) - start
        out: dict = {"gpu": dict(self.gpu), "duration_s": duration, "samples": len(self.samples),
                     "interval_s": self.interval_s}
        for name in SAMPLED_FIELDS:
            out[name] = summarise_values([v[name] for _, v in self.samples])
        energy_start, energy_stop = self._energy_mj
        if energy_start is not None and energy_stop is not None:
            out["energy_j"] = (energy_stop - energy_start) / 1000.0
            out["energy_source"] = "NVML total-energy counter"
        else:
            power = [(t, v["power_w"]) for t, v in self.samples if v["power_w"] is not None]
            out["energy_j"] = integrate_power(power)
            out["energy_source"] = (f"power integrated over {len(power)} samples (no energy counter)"
                                    if out["energy_j"] is not None else None)
        out["notes"] = list(self.notes)
        return out


def summarise_values(values) -> dict | None:
    """{"mean", "p95", "max"} of the readings that exist (p95 interpolated linearly, as numpy does); None if none."""
    xs = sorted(float(v) for v in values if v is not None)
    if not xs:
        return None
    rank = 0.95 * (len(xs) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(xs) - 1)
    p95 = xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)
    return {"mean": sum(xs) / len(xs), "p95": p95, "max": xs[-1]}


def integrate_power(samples: list[tuple[float, float]]) -> float | None:
    """Joules from (seconds, watts) readings by the trapezoid rule; None with fewer than two readings."""
    if len(samples) < 2:
        return None
    return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(samples, samples[1:]))


def joules_per_mask(summary: dict, n_masks: int) -> float | None:
    """Energy of a monitored block divided by the masks it produced; None without a GPU or an energy figure."""
    if n_masks <= 0:
        raise ValueError(f"n_masks must be positive; got {n_masks}")
    energy = summary.get("energy_j") if summary.get("gpu") else None
    return None if energy is None else energy / n_masks


def _as_device(device) -> torch.device | None:
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else None
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def _current_cuda_index() -> int:
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _torch_cuda_uuid(index: int) -> str:
    # torch prints the UUID bare ("58e4fd8e-..."), NVML with a "GPU-" (or "MIG-") prefix.
    return str(torch.cuda.get_device_properties(index).uuid)


def _bare_uuid(uuid: str) -> str:
    uuid = _text(uuid).strip().lower()
    for prefix in ("gpu-", "mig-"):
        uuid = uuid.removeprefix(prefix)
    return uuid


def _find_handle(nvml, cuda_uuid: str | None, index: int, notes: list[str]) -> tuple[object, dict]:
    """The NVML handle of the CUDA device with `cuda_uuid`, else NVML's device `index` (with a note)."""
    bare = _bare_uuid(cuda_uuid) if cuda_uuid else ""
    handle, matched = None, None
    if bare:
        for prefixed in (f"GPU-{bare}", f"MIG-{bare}"):
            try:
                handle, matched = nvml.nvmlDeviceGetHandleByUUID(prefixed), "uuid"
                break
            except Exception:
                continue
        if handle is None:
            for i in range(nvml.nvmlDeviceGetCount()):
                candidate = nvml.nvmlDeviceGetHandleByIndex(i)
                if _bare_uuid(_field(lambda c=candidate: nvml.nvmlDeviceGetUUID(c)) or "") == bare:
                    handle, matched = candidate, "uuid"
                    break
    if handle is None:
        handle, matched = nvml.nvmlDeviceGetHandleByIndex(index), "index"
        why = f"no NVML device has the CUDA UUID {cuda_uuid}" if bare else "the CUDA device's UUID is unknown"
        notes.append(f"NVML device taken by index {index}: {why}; NVML ignores CUDA_VISIBLE_DEVICES, "
                     f"so it may be another GPU")
    nvml_uuid = _field(lambda: _text(nvml.nvmlDeviceGetUUID(handle)))
    return handle, {
        "cuda_index": index,
        "name": _field(lambda: _text(nvml.nvmlDeviceGetName(handle))),
        "uuid": nvml_uuid,
        "matched_by": matched,
    }
