"""Small helpers shared by the kernel tests."""

from __future__ import annotations

import torch

# (dtype, atol, rtol) for comparing a kernel's low-precision output with the reference's. The
# interpreter truncates fp32 -> bf16 instead of rounding, so allow one bf16/fp16 ulp.
DTYPE_TOLERANCES = [
    (torch.float32, 2e-5, 1e-5),
    (torch.bfloat16, 2e-2, 1.6e-2),
    (torch.float16, 2e-3, 2e-3),
]


def assert_close_report(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = ""):
    """assert_close that names the first mismatching indices, and fails on any NaN left in `actual`."""
    a, e = actual.float(), expected.float()
    nan = torch.isnan(a) & ~torch.isnan(e)
    if nan.any():
        idx = nan.nonzero()[:5].tolist()
        raise AssertionError(f"{what}: {int(nan.sum())} element(s) left unwritten (NaN), first at {idx}")
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        idx = bad.nonzero()[:5]
        lines = [f"  {tuple(i.tolist())}: got {a[tuple(i)].item():.7g}, want {e[tuple(i)].item():.7g}" for i in idx]
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} elements differ; first:\n" + "\n".join(lines))


def non_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values as `x`, laid out with a stride gap (a slice of a wider tensor)."""
    wide = torch.empty(*x.shape[:-1], x.shape[-1] * 2 + 1, dtype=x.dtype, device=x.device)
    view = wide[..., 1 : 2 * x.shape[-1] + 1 : 2]
    view.copy_(x)
    assert not view.is_contiguous() or x.numel() <= 1
    return view


def sample_cli(*args):
    """`ssb-fast sample ARGS...` through typer's test runner."""
    from typer.testing import CliRunner

    from ssb_fast.cli import app

    return CliRunner().invoke(app, ["sample", *map(str, args)])


def wait_until(proc, condition, timeout: float, what: str = "the process", poll_s: float = 0.002) -> bool:
    """Poll `condition` every few ms while `proc` runs: True once it holds, False if the process ends first;
    kill it and fail after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll_s)
    proc.kill()
    raise AssertionError(f"{what} neither reached the kill point nor ended")
