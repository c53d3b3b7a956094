"""What the GPUs are, from NVML (nvidia-ml-py): driver, memory, clocks and power, for reports.

NVML is read lazily and every failure (no driver, no library, a virtualised GPU that hides a field)
becomes a missing value, never an error: a report about the machine must not stop on the machine.
"""

from __future__ import annotations


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
