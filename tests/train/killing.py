"""Kill a training subprocess once its run folder has logged N steps, and read its logged curve."""

import os
import signal
import subprocess
import time
from pathlib import Path

from peftkit.train.metrics import read_metrics


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return sum(1 for r in read_metrics(path) if "loss" in r) if path.exists() else 0


def kill_after(proc: subprocess.Popen, out: Path, steps: int) -> None:
    """SIGKILL ``proc`` once ``steps`` training steps are logged (or it ends, or 120 s pass)."""
    deadline = time.time() + 120
    while steps_logged(out) < steps and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def curve(out: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("lr")) for r in read_metrics(out / "metrics.jsonl")]
