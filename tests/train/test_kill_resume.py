"""SIGKILL a training process at arbitrary moments, resume it, and get the uninterrupted loss curve."""

import subprocess
import sys
from pathlib import Path

from .killing import curve, kill_after

SCRIPT = Path(__file__).parent / "resume_script.py"


def start(out: Path, delay: float, resume: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, str(SCRIPT), str(out), str(delay)] + (["resume"] if resume else [])
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_killed_and_resumed_runs_log_the_same_curve_as_an_uninterrupted_one(tmp_path):
    reference = tmp_path / "reference"
    done = start(reference, 0.0)
    assert done.wait(timeout=120) == 0, done.stderr.read().decode()

    out = tmp_path / "killed"
    kill_after(start(out, 0.02), out, 3)  # early in epoch 0
    kill_after(start(out, 0.02, resume=True), out, 9)  # in epoch 1, near an eval
    last = start(out, 0.0, resume=True)
    assert last.wait(timeout=120) == 0, last.stderr.read().decode()

    expected = curve(reference)
    assert len(expected) == 15 + 4  # 15 steps (5 per epoch), evals at 4, 8, 12 and the last step
    assert curve(out) == expected
