""".ci/run removes its temporary virtual environment on exit, whatever the outcome.

The script runs with stand-ins for python3, python and ssb-fast first on PATH (nothing is installed), and
TMPDIR pointing at an empty folder that must be empty again afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "run"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def fake_tools(bin_dir: Path, python_body: str) -> None:
    """python3 -m venv DIR makes DIR/bin/activate (a no-op); python runs `python_body`; ssb-fast succeeds."""
    bin_dir.mkdir()
    scripts = {
        "python3": '#!/bin/sh\n[ "$1 $2" = "-m venv" ] && mkdir -p "$3/bin" && : > "$3/bin/activate"\n'
                   'touch "$3/bin/2GB-of-torch"\n',
        "python": f"#!/bin/sh\n{python_body}\n",
        "ssb-fast": "#!/bin/sh\nexit 0\n",
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)


def start(tmp_path: Path, python_body: str) -> tuple[subprocess.Popen, Path]:
    fake_tools(tmp_path / "bin", python_body)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmpdir)}
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, tmpdir


@pytest.mark.parametrize("python_body, code", [("exit 0", 0), ("exit 3", 3)], ids=["passes", "fails"])
def test_the_environment_is_removed_after_success_and_failure(tmp_path, python_body, code):
    proc, tmpdir = start(tmp_path, python_body)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == code, out
    assert os.listdir(tmpdir) == [], "the temporary environment was left behind"


def test_the_environment_is_removed_when_the_job_is_terminated(tmp_path):
    proc, tmpdir = start(tmp_path, "sleep 30")  # the first pip install hangs
    deadline = time.monotonic() + 30
    while not list(tmpdir.glob("*/venv/bin/activate")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # as a CI runner stops a job: the whole process group
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    assert os.listdir(tmpdir) == []
