"""GPU inventory from NVML: read through a stand-in NVML, and no error where NVML is missing."""

from __future__ import annotations

from types import SimpleNamespace

from ssb_fast.telemetry import gpu_inventory


class FakeNVML:
    NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2

    def __init__(self, fail_init=False):
        self.fail_init, self.shutdowns = fail_init, 0

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self):
        return b"580.65"

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return f"NVIDIA H100 80GB HBM3 #{h}"

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=80 * 2**30, used=2**30)

    def nvmlDeviceGetMaxClockInfo(self, h, kind):
        return {1: 1980, 2: 2619}[kind]

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        if h == 1:
            raise RuntimeError("Not Supported")
        return 700000

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=37)


def test_inventory_reads_each_gpu_and_tolerates_missing_fields():
    nvml = FakeNVML()
    gpus, note = gpu_inventory(nvml)
    assert note is None and nvml.shutdowns == 1
    assert [g["name"] for g in gpus] == ["NVIDIA H100 80GB HBM3 #0", "NVIDIA H100 80GB HBM3 #1"]
    assert gpus[0]["driver"] == "580.65" and gpus[0]["memory_total_gib"] == 80.0
    assert gpus[0]["sm_clock_max_mhz"] == 1980 and gpus[0]["mem_clock_max_mhz"] == 2619
    assert gpus[0]["power_limit_w"] == 700.0 and gpus[1]["power_limit_w"] is None
    assert gpus[1]["utilization_pct"] == 37


def test_no_nvml_is_a_note_not_an_error():
    gpus, note = gpu_inventory(FakeNVML(fail_init=True))
    assert gpus == [] and "NVML unavailable (NVML Shared Library Not Found)" == note
