"""`ssb-fast info`: versions, the device, the Triton interpreter, and which backend each op uses."""

from __future__ import annotations

import os
import platform
import sys

import torch
import typer

import ssb_fast
from ssb_fast import kernels
from ssb_fast.cli.app import DeviceOption, ExitCode, JsonOption, app, fail, print_json
from ssb_fast.devices import describe_device, resolve_device
from ssb_fast.telemetry import gpu_inventory


def collect_info(device: torch.device) -> dict:
    """Everything `info` reports, as a dict (the CLI prints it as text or JSON)."""
    triton_version = None
    if kernels.HAS_TRITON:
        import triton

        triton_version = triton.__version__
    gpus, nvml_note = gpu_inventory()
    return {
        "ssb_fast": ssb_fast.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "device": str(device),
        "device_detail": describe_device(device),
        "triton_interpret": kernels.interpreting(),
        "triton_interpret_env": os.environ.get("TRITON_INTERPRET"),
        "op_backends": kernels.op_backends(device),
        "gpus": gpus,
        "nvml": nvml_note or "ok",
    }


@app.command()
def info(device: DeviceOption = "auto", json_out: JsonOption = False) -> None:
    """Show versions, the device found, TRITON_INTERPRET, and the backend (triton or torch) of each op.

    Ops dispatch on the device of their tensors: CUDA tensors run the hand-written Triton kernels,
    CPU tensors the PyTorch reference. TRITON_INTERPRET=1 only matters to code that calls a Triton
    launcher directly (the kernel tests do), which then runs on CPU tensors in Triton's interpreter.
    """
    try:
        dev = resolve_device(device)
    except ValueError as err:
        fail(str(err), ExitCode.BAD_ARGUMENTS)
    data = collect_info(dev)
    if json_out:
        print_json(data)
        return
    rows = [
        ("ssb-fast", data["ssb_fast"]),
        ("python", f"{data['python']} ({sys.executable})"),
        ("torch", f"{data['torch']} (CUDA {data['torch_cuda'] or 'none'})"),
        ("triton", data["triton"] or "not installed (every op runs its PyTorch reference)"),
        ("device", data["device_detail"]),
        ("CUDA devices", str(data["cuda_devices"])),
        ("TRITON_INTERPRET", "on" if data["triton_interpret"] else "off"),
    ]
    rows += [(f"op {name}", backend) for name, backend in data["op_backends"].items()]
    for gpu in data["gpus"]:
        mem = f"{gpu['memory_total_gib']:.1f} GiB" if gpu["memory_total_gib"] is not None else "memory ?"
        power = f", {gpu['power_limit_w']:.0f} W limit" if gpu["power_limit_w"] is not None else ""
        rows.append((f"gpu {gpu['index']}", f"{gpu['name']} ({mem}{power}, driver {gpu['driver']})"))
    if not data["gpus"]:
        rows.append(("NVML", data["nvml"]))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")
