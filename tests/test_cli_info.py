"""`ssb-fast info` and the CLI's shared behaviour."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from typer.testing import CliRunner

from ssb_fast.cli import app

runner = CliRunner()


def test_info_reports_versions_and_backends():
    result = runner.invoke(app, ["info", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"torch             {torch.__version__}" in result.output
    assert "op cfg_step       torch" in result.output
    assert "op bridge_sample  torch" in result.output
    assert "TRITON_INTERPRET" in result.output


def test_info_json():
    result = runner.invoke(app, ["info", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["torch"] == torch.__version__
    assert data["device"] == "cpu"
    assert data["op_backends"] == {"bridge_sample": "torch", "cfg_step": "torch", "pair_counts": "torch",
                                   "pairwise_jsd": "torch"}
    assert isinstance(data["triton_interpret"], bool)


def test_bad_device_is_exit_code_2_without_traceback():
    result = runner.invoke(app, ["info", "--device", "tpu"])
    assert result.exit_code == 2
    assert "device must be auto, cpu, cuda or cuda:N" in result.output
    assert "Traceback" not in result.output
    if not torch.cuda.is_available():
        result = runner.invoke(app, ["info", "--device", "cuda:0"])
        assert result.exit_code == 2 and "sees no CUDA device" in result.output


def test_console_script_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "ssb_fast.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("ssb-fast ")
