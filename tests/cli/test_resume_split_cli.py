"""`peftkit train --resume RUN --batch-size B --gradient-accumulation-steps K`: another split of the
run's global batch continues the run (and is recorded for the next resume); other flags stay refused."""

import json

import pytest
import yaml

from peftkit import PeftModel
from peftkit.cli.main import main
from peftkit.train.metrics import read_metrics

from .conftest import review_records, tiny_cls_args, write_jsonl


def crash_at(monkeypatch, step):
    original = PeftModel.after_optimizer_step

    def hook(self, global_step):
        if global_step == step:
            raise KeyboardInterrupt
        original(self, global_step)
    monkeypatch.setattr(PeftModel, "after_optimizer_step", hook)


def test_resume_with_another_split_of_the_global_batch(tmp_path, tiny_bert_dir, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "reviews.jsonl", review_records(64))
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(tiny_cls_args(tiny_bert_dir, data, reference, "--save-steps", "1")) == 0
    with monkeypatch.context() as patch:
        crash_at(patch, 4)
        assert main(tiny_cls_args(tiny_bert_dir, data, run, "--save-steps", "1")) == 130
    assert main(["train", "--resume", str(run), "--learning-rate", "1e-3"]) != 0
    assert "drop --learning-rate" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--batch-size", "4", "--gradient-accumulation-steps=2"]) == 0
    training = yaml.safe_load((run / "config.yaml").read_text())["training"]
    assert (training["batch_size"], training["gradient_accumulation_steps"]) == (4, 2)
    # The same steps; the steps before the kill exactly, the later ones with other dropout draws
    # (BERT's dropout masks follow the micro-batch shapes), so only close: tests/train checks exactness.
    curves = [[(r["step"], r["loss"]) for r in read_metrics(d / "metrics.jsonl") if "loss" in r] for d in (reference, run)]
    assert [s for s, _ in curves[1]] == [s for s, _ in curves[0]] == [1, 2, 3, 4, 5, 6]
    assert curves[1][:3] == curves[0][:3]
    assert [l for _, l in curves[1]] == pytest.approx([l for _, l in curves[0]], abs=1e-2)
    assert json.loads((run / "summary.json").read_text())["after"] is not None
