"""`torchrun --nproc-per-node 2 -m peftkit.cli.main train` (gloo on CPU) against the same run in one process."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from peftkit.cli.eval import build_parser, evaluate
from peftkit.cli.main import main
from peftkit.train.metrics import read_metrics

from .conftest import review_records, write_jsonl

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def run_args(model_dir, data, out, batch_size, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data), "--text-column", "review",
            "--label-column", "sentiment", "--output-dir", str(out), "--target-modules", "query", "value",
            "--max-steps", "4", "--eval-steps", "2", "--batch-size", str(batch_size), "--max-length", "16",
            "--lora-dropout", "0", "--device", "cpu", "--no-progress-bar", "--no-tensorboard", *extra]


def torchrun(args, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*TORCHRUN, "-m", "peftkit.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def without_dropout(model_dir, folder):
    """A copy of the model folder with dropout off: then how a step's examples are split over ranks
    cannot change its gradient, and 2 ranks must match one process."""
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert_dir):
    """The same job twice: 2 ranks x 4 examples (DDP), and one process x 8 examples."""
    tmp = tmp_path_factory.mktemp("dist-cli")
    model_dir = without_dropout(tiny_bert_dir, tmp / "model")
    data = write_jsonl(tmp / "reviews.jsonl", review_records(120))
    done = torchrun(run_args(model_dir, data, tmp / "ddp", 4))
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(run_args(model_dir, data, tmp / "single", 8)) == 0
    return tmp / "ddp", tmp / "single", done.stdout


def test_two_ranks_train_like_one_process_with_the_same_global_batch(runs):
    ddp, single, _ = runs
    a, b = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (ddp, single))
    assert a.keys() == b.keys() and a
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-5, key
    after = [json.loads((r / "summary.json").read_text())["after_metrics"] for r in (ddp, single)]
    assert after[0]["accuracy"] == after[1]["accuracy"] and after[0]["f1"] == after[1]["f1"]
    assert after[0]["loss"] == pytest.approx(after[1]["loss"], rel=1e-5)


def test_only_rank_0_prints_and_writes_the_run_folder(runs):
    ddp, single, stdout = runs
    assert stdout.count("run folder:") == 1 and "global batch 8 = 4 per device x 2 x 1" in stdout
    steps = [r["step"] for r in read_metrics(ddp / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]  # a second writer would have logged every step twice
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
    assert not [p for p in ddp.rglob(".*")], "temporary files left behind"


def test_the_adapter_of_two_ranks_evaluates_the_same_in_one_process(runs):
    ddp, _, _ = runs
    metrics = evaluate(build_parser().parse_args([str(ddp), "--device", "cpu"]))
    after = json.loads((ddp / "summary.json").read_text())["after_metrics"]
    assert metrics["accuracy"] == after["accuracy"]
    assert metrics["loss"] == pytest.approx(after["loss"], rel=1e-5)


def test_fsdp_causal_lm_run_through_the_cli(tmp_path, tiny_llama_dir, qa_jsonl):
    """FSDP2 on gloo: the decoder layers are sharded, generation before/after runs on both ranks."""
    out = tmp_path / "fsdp"
    args = ["train", "--task", "causal-lm", "--model", str(tiny_llama_dir), "--data", str(qa_jsonl),
            "--question-column", "prompt", "--answer-column", "response", "--output-dir", str(out),
            "--max-steps", "2", "--eval-steps", "2", "--batch-size", "2", "--max-length", "48",
            "--num-samples", "1", "--max-new-tokens", "3", "--distributed", "fsdp", "--device", "cpu",
            "--no-progress-bar", "--no-tensorboard"]
    done = torchrun(args)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and len(summary["samples"]) == 1
    assert "data parallel (fsdp) over 2 processes" in done.stdout
    metrics = evaluate(build_parser().parse_args([str(out), "--device", "cpu"]))
    assert metrics["loss"] == pytest.approx(summary["after_metrics"]["loss"], rel=1e-5)


def test_a_user_error_under_torchrun_stops_every_rank_with_the_message(tmp_path, tiny_bert_dir, reviews_jsonl):
    """Rank 0 decides the run folder; its refusal reaches rank 1 too, so no rank waits for the other."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    done = torchrun(run_args(tiny_bert_dir, reviews_jsonl, taken, 4), timeout=60)
    assert done.returncode != 0
    assert done.stderr.count("already exists and is not empty") == 2  # one line per rank, then both exit
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"]
