"""`peftkit train` killed with SIGKILL, then `peftkit train --resume RUN`, logs the uninterrupted curve."""

import json
import os
import signal
import subprocess
import sys
import time

from peftkit.cli.main import main
from peftkit.train.metrics import read_metrics

from .conftest import review_records, tiny_cls_args, write_jsonl


def curve(run):
    return [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("eval_accuracy"))
            for r in read_metrics(run / "metrics.jsonl")]


def steps_logged(run):
    path = run / "metrics.jsonl"
    return sum(1 for r in read_metrics(path) if "loss" in r) if path.exists() else 0


def test_resume_after_sigkill_reproduces_the_run(tmp_path, tiny_bert_dir):
    data = write_jsonl(tmp_path / "reviews.jsonl", review_records(400))
    extra = ["--max-steps", "40", "--eval-steps", "10", "--save-steps", "1", "--lora-dropout", "0.1"]
    reference = tmp_path / "reference"
    assert main(tiny_cls_args(tiny_bert_dir, data, reference, *extra)) == 0

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "peftkit.cli.main", *tiny_cls_args(tiny_bert_dir, data, run, *extra)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while steps_logged(run) < 13 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"

    resumed = subprocess.run([sys.executable, "-m", "peftkit.cli.main", "train", "--resume", str(run)],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert curve(run) == curve(reference)
    after = json.loads((run / "summary.json").read_text())["after"]
    assert after == json.loads((reference / "summary.json").read_text())["after"]
    assert not (run / "checkpoints").exists()
