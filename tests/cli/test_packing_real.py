"""``peftkit train --task causal-lm --packing`` on the bundled SmolLM2 and Q/A pairs (slow tier)."""

import json

import pytest

from peftkit.cli.main import main

pytestmark = pytest.mark.slow


def test_packed_smollm2_run_lowers_held_out_loss(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--task", "causal-lm", "--packing", "--batch-size", "4", "--max-steps", "5", "--eval-steps", "5",
            "--max-eval-samples", "16", "--num-samples", "1", "--max-new-tokens", "8", "--output-dir", str(run),
            "--no-progress-bar", "--no-tensorboard"]
    assert main(argv) == 0
    assert "training examples packed into" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_examples"] < 0.75 * summary["packed_examples"]  # rows, fewer than the pairs
    assert summary["after"] < summary["before"] - 0.3
    assert summary["after_metrics"]["perplexity"] < summary["before_metrics"]["perplexity"]
