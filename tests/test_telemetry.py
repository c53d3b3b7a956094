"""GPU inventory and the GPU monitor from NVML: read through stand-in NVMLs, and no error where NVML is missing."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import pytest
import torch

from ssb_fast.telemetry import GpuMonitor, gpu_inventory, integrate_power, joules_per_mask, summarise_values


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


# ---------------------------------------------------------------- GpuMonitor
class ScriptedNVML:
    """NVML with two GPUs whose readings come from scripts: one value per sample, in order."""

    NVML_CLOCK_SM = 1
    UUIDS = {"h0": "GPU-00000000-aaaa-bbbb-cccc-000000000000", "h1": "GPU-11111111-aaaa-bbbb-cccc-111111111111"}

    def __init__(self, util, mem_gib, power_w, sm_mhz, energy_mj=None, by_uuid=True):
        self.util, self.mem, self.power, self.sm = list(util), list(mem_gib), list(power_w), list(sm_mhz)
        self.energy = list(energy_mj) if energy_mj is not None else None
        self.by_uuid = by_uuid
        self.inits = self.shutdowns = 0

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return f"h{i}"

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if not self.by_uuid:
            raise RuntimeError("Not Supported")
        for handle, known in self.UUIDS.items():
            if known == uuid:
                return handle
        raise RuntimeError("Not Found")

    def nvmlDeviceGetUUID(self, h):
        return self.UUIDS[h]

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H200"

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self.util.pop(0))

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=self.mem.pop(0) * 2**30)

    def nvmlDeviceGetPowerUsage(self, h):
        return self.power.pop(0) * 1000  # milliwatts

    def nvmlDeviceGetClockInfo(self, h, kind):
        assert kind == self.NVML_CLOCK_SM
        return self.sm.pop(0)

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if self.energy is None:
            raise RuntimeError("Not Supported")
        return self.energy.pop(0)


def scripted_clock(times):
    times = iter(times)
    return lambda: next(times)


def four_samples(nvml, **kwargs):
    """Enter (1 sample), 2 samples by hand, exit (1 sample); no thread, so the samples are exactly these."""
    with GpuMonitor("cuda:0", interval_s=None, nvml=nvml, **kwargs) as monitor:
        monitor.sample()
        monitor.sample()
    return monitor


def test_monitor_summary_from_scripted_readings_and_energy_counter():
    nvml = ScriptedNVML(util=[10, 20, 30, 40], mem_gib=[1, 2, 2, 3], power_w=[100, 200, 300, 400],
                        sm_mhz=[1980, 1980, 1755, 1980], energy_mj=[1_000_000, 1_250_500])
    # cuda:0 is NVML's second GPU (CUDA_VISIBLE_DEVICES=1): found by UUID, torch's bare form.
    monitor = four_samples(nvml, cuda_uuid="11111111-aaaa-bbbb-cccc-111111111111")
    s = monitor.summary()
    assert s["gpu"] == {"cuda_index": 0, "name": "NVIDIA H200", "uuid": ScriptedNVML.UUIDS["h1"],
                        "matched_by": "uuid"}
    assert s["samples"] == 4 and nvml.shutdowns == 1 and nvml.inits == 1
    assert s["utilization_pct"] == pytest.approx({"mean": 25.0, "p95": 38.5, "max": 40.0})  # p95: 30 + .85 * 10
    assert s["power_w"] == pytest.approx({"mean": 250.0, "p95": 385.0, "max": 400.0})
    assert s["memory_used_gib"] == pytest.approx({"mean": 2.0, "p95": 2.85, "max": 3.0})
    assert s["sm_clock_mhz"]["max"] == 1980.0 and s["sm_clock_mhz"]["mean"] == pytest.approx(1923.75)
    assert s["energy_j"] == pytest.approx(250.5) and s["energy_source"] == "NVML total-energy counter"
    assert s["notes"] == []
    assert joules_per_mask(s, 256) == pytest.approx(250.5 / 256)


def test_monitor_integrates_power_without_energy_counter():
    nvml = ScriptedNVML(util=[50] * 4, mem_gib=[1] * 4, power_w=[100, 200, 300, 400], sm_mhz=[1000] * 4)
    # clock: enter, sample, sample, sample, exit sample, exit
    monitor = four_samples(nvml, cuda_uuid="GPU-11111111-aaaa-bbbb-cccc-111111111111",
                           clock=scripted_clock([0.0, 0.0, 1.0, 2.0, 3.0, 3.5]))
    s = monitor.summary()
    assert s["duration_s"] == pytest.approx(3.5)
    assert s["energy_j"] == pytest.approx(150 + 250 + 350)  # trapezoids of 1 s each
    assert s["energy_source"].startswith("power integrated over 4 samples")


def test_monitor_falls_back_to_the_index_with_a_note():
    nvml = ScriptedNVML(util=[1] * 4, mem_gib=[1] * 4, power_w=[1] * 4, sm_mhz=[1] * 4, energy_mj=[0, 0])
    with GpuMonitor("cuda:1", interval_s=None, nvml=nvml, cuda_uuid="deadbeef-0000-0000-0000-000000000000") as mon:
        pass
    s = mon.summary()
    assert s["gpu"]["matched_by"] == "index" and s["gpu"]["uuid"] == ScriptedNVML.UUIDS["h1"]
    assert "taken by index 1" in s["notes"][0] and "CUDA_VISIBLE_DEVICES" in s["notes"][0]


def test_monitor_scans_uuids_when_lookup_by_uuid_is_missing():
    nvml = ScriptedNVML(util=[1] * 2, mem_gib=[1] * 2, power_w=[1] * 2, sm_mhz=[1] * 2, energy_mj=[0, 0],
                        by_uuid=False)
    with GpuMonitor("cuda:0", interval_s=None, nvml=nvml, cuda_uuid="11111111-AAAA-bbbb-cccc-111111111111") as mon:
        pass
    assert mon.summary()["gpu"]["matched_by"] == "uuid" and mon.summary()["gpu"]["uuid"].startswith("GPU-1111")


def test_monitor_thread_samples_and_stops():
    n = 10_000
    nvml = ScriptedNVML(util=[5] * n, mem_gib=[1] * n, power_w=[70] * n, sm_mhz=[1500] * n, energy_mj=[0, 700])
    with GpuMonitor("cuda:0", interval_s=0.005, nvml=nvml, cuda_uuid=ScriptedNVML.UUIDS["h0"]) as mon:
        time.sleep(0.03)
    assert mon._thread is None and nvml.shutdowns == 1
    s = mon.summary()
    assert s["samples"] >= 2 and s["power_w"] == {"mean": 70.0, "p95": 70.0, "max": 70.0}
    assert s["energy_j"] == pytest.approx(0.7)


def test_monitor_without_gpu_or_nvml_says_why(monkeypatch):
    with GpuMonitor("cpu") as mon:
        pass
    assert mon.summary() == {"gpu": None, "reason": "device is cpu: no GPU to monitor"}
    with GpuMonitor("cuda:0", nvml=FakeNVML(fail_init=True), cuda_uuid="x") as mon:
        pass
    assert mon.summary() == {"gpu": None, "reason": "NVML unavailable (NVML Shared Library Not Found)"}
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    with GpuMonitor("cuda:0", cuda_uuid="x") as mon:
        pass
    assert mon.summary() == {"gpu": None, "reason": "nvidia-ml-py is not installed"}
    assert joules_per_mask(mon.summary(), 8) is None
    if not torch.cuda.is_available():
        with GpuMonitor() as mon:  # default device: the current CUDA device, of which there is none here
            pass
        assert mon.summary()["gpu"] is None


def test_summarise_values_skips_missing_readings():
    assert summarise_values([None, 3, None, 1, 2]) == {"mean": 2.0, "p95": pytest.approx(2.9), "max": 3.0}
    assert summarise_values([None, None]) is None
    assert integrate_power([(0.0, 10.0)]) is None
