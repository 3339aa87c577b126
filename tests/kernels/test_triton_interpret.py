"""The Triton kernels, run by Triton's CPU interpreter, against their references (float32).

Skipped where Triton is not installed. The interpreter is chosen when Triton is imported, so
the check runs in a child process: benchmarks/check_kernels_gpu.py --small --device cpu.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_match_references_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = ROOT / "benchmarks" / "check_kernels_gpu.py"
    proc = subprocess.run([sys.executable, str(script), "--small", "--device", "cpu", "--dtype", "float32"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fused = triton" in proc.stdout
