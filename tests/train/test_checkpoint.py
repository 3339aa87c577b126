"""Checkpoints are written atomically and resume reproduces the same run (in-process)."""

import shutil

import pytest
import torch

from peftkit.train import Trainer, TrainingArguments
from peftkit.train import checkpoint as ckpt
from peftkit.train.metrics import read_metrics

from .conftest import TinyClassifier, classification_data


def args(out, **kw):
    base = dict(output_dir=str(out), progress_bar=False, tensorboard=False, learning_rate=1e-2, device="cpu",
                batch_size=4, gradient_accumulation_steps=3, epochs=3, save_steps=1, save_total_limit=2)
    return TrainingArguments(**{**base, **kw})


def test_a_failed_write_leaves_no_checkpoint_and_keeps_the_previous_one(tmp_path, monkeypatch):
    model = TinyClassifier()
    good = ckpt.save_checkpoint(tmp_path, 1, model, {"state": {"global_step": 1}})

    def broken_save(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, model, {"state": {"global_step": 2}})
    assert ckpt.list_checkpoints(tmp_path) == [good]
    assert [p.name for p in tmp_path.iterdir()] == [good.name]  # the temporary folder is gone too


def test_half_written_folders_are_ignored(tmp_path):
    (tmp_path / ".step-00000009.tmp-123").mkdir()
    (tmp_path / "step-00000008").mkdir()  # no state file: never finished
    assert ckpt.latest_checkpoint(tmp_path) is None


def test_overwriting_a_checkpoint_folder_replaces_it_whole(tmp_path):
    model = TinyClassifier()
    ckpt.write_checkpoint(tmp_path / "best", model, {"state": {"v": 1}})
    ckpt.write_checkpoint(tmp_path / "best", model, {"state": {"v": 2}})
    assert ckpt.load_checkpoint(tmp_path / "best")["state"] == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_resume_from_a_middle_checkpoint_reproduces_the_loss_curve(tmp_path):
    """Crossing epoch boundaries with accumulation and dropout: the RNG and data position matter."""
    data = classification_data(40)  # 10 batches of 4, 4 steps of <= 3 batches per epoch
    Trainer(TinyClassifier(dropout=0.3), args(tmp_path / "a"), data).train()
    full = [r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")]
    assert len(full) == 12

    Trainer(TinyClassifier(dropout=0.3), args(tmp_path / "b", save_total_limit=20), data).train()
    # keep only the step-5 checkpoint (mid epoch 2), as if the run had been killed after it
    for path in ckpt.list_checkpoints(tmp_path / "b" / "checkpoints"):
        if path.name != "step-00000005":
            shutil.rmtree(path)
    resumed = Trainer(TinyClassifier(dropout=0.3, seed=123), args(tmp_path / "b"), data).train(resume_from=True)
    assert resumed.global_step == 12
    assert [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == full
