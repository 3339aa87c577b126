"""The main job on the real bundled models and data, in short runs (marked slow; they still run in CI)."""

import json

import pytest
import yaml

from peftkit import PeftModel
from peftkit.cli import common
from peftkit.cli.main import main
from peftkit.cli.runconfig import DataOptions
from peftkit.train import Trainer, TrainingArguments

pytestmark = pytest.mark.slow


def reload_and_evaluate(run, task):
    """Held-out metrics of run/adapter loaded with PeftModel.from_pretrained onto a fresh base model."""
    summary = json.loads((run / "summary.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    base_dir = common.bundled_model_dir(task)
    tokenizer = common.load_tokenizer(base_dir)
    label2id = {label: i for i, label in enumerate(summary["labels"])} if "labels" in summary else None
    data = common.build_data(task, tokenizer, DataOptions(**config["data"]), config["training"]["seed"], label2id)
    base = common.load_classifier(base_dir, label2id) if label2id else common.load_causal_lm(base_dir)
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
    args = TrainingArguments(task=task, progress_bar=False, tensorboard=False)
    return summary, Trainer(model, args, eval_dataset=data.eval, collate_fn=data.collate).evaluate()


def test_default_job_learns_minilm_sentiment_and_the_adapter_reproduces_it(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--max-steps", "40", "--eval-steps", "20", "--max-eval-samples", "160", "--learning-rate", "3e-3",
            "--output-dir", str(run), "--no-progress-bar"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy:" in out and str(run) in out
    summary, metrics = reload_and_evaluate(run, "classification")
    assert summary["model"] == str(common.bundled_model_dir("classification"))
    assert summary["after"] >= 0.62 and summary["after"] > summary["before"] + 0.05
    assert metrics["accuracy"] == summary["after"]


def test_causal_lm_job_lowers_held_out_loss_and_the_adapter_reproduces_it(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--task", "causal-lm", "--max-steps", "6", "--eval-steps", "6", "--max-eval-samples", "16",
            "--num-samples", "2", "--max-new-tokens", "12", "--output-dir", str(run), "--no-progress-bar"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "before:" in out and "after:" in out
    summary, metrics = reload_and_evaluate(run, "causal-lm")
    assert summary["after"] < summary["before"] - 0.3
    assert summary["after_metrics"]["perplexity"] < summary["before_metrics"]["perplexity"]
    assert len(summary["samples"]) == 2 and all(s["after"] for s in summary["samples"])
    assert metrics["loss"] == pytest.approx(summary["after"], abs=1e-5)


def test_prompt_tuning_lowers_smollm2_held_out_loss_and_its_file_reproduces_it(tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--task", "causal-lm", "--method", "prompt", "--num-virtual-tokens", "8", "--max-steps", "8",
            "--learning-rate", "2e-2", "--eval-steps", "8", "--max-eval-samples", "16", "--num-samples", "1",
            "--max-new-tokens", "8", "--output-dir", str(run), "--no-progress-bar"]
    assert main(argv) == 0
    summary, metrics = reload_and_evaluate(run, "causal-lm")
    assert summary["after"] < summary["before"] - 0.1  # measured 3.594 -> 3.415
    assert summary["trainable_params"] == 8 * 576  # the prompt only: 8 virtual tokens of SmolLM2's width
    assert metrics["loss"] == pytest.approx(summary["after"], abs=1e-5)


def test_ptuning_v2_lowers_smollm2_held_out_loss_and_its_file_reproduces_it(tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--task", "causal-lm", "--method", "ptuning_v2", "--num-virtual-tokens", "8", "--max-steps", "6",
            "--prefix-init-text", "Answer the question in a few words.", "--learning-rate", "5e-3",
            "--eval-steps", "6", "--max-eval-samples", "16", "--num-samples", "1", "--max-new-tokens", "8",
            "--output-dir", str(run), "--no-progress-bar"]
    assert main(argv) == 0
    summary, metrics = reload_and_evaluate(run, "causal-lm")
    # The prefix starts as SmolLM2's own keys/values for the text (a random prefix starts at ~9.4)
    assert summary["before"] < 3.6 and summary["after"] < summary["before"] - 0.1, summary  # measured 3.255 -> 3.046
    assert summary["trainable_params"] == 8 * 30 * 2 * 3 * 64  # p x layers x (key, value) x 3 KV heads x 64
    assert metrics["loss"] == pytest.approx(summary["after"], abs=1e-5)
