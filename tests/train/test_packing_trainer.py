"""The trainer on packed rows: token-weighted step losses, epochs of rows, refusal, kill and resume."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama

import peftkit
from peftkit.data import IGNORE_INDEX, FeatureDataset
from peftkit.data.packing import PackedCollator, pack_dataset
from peftkit.train import Trainer, TrainingArguments

from .killing import curve, kill_after

SCRIPT = Path(__file__).parent / "packing_resume_script.py"


def sequences(n: int, seed: int = 0) -> FeatureDataset:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, length in enumerate(torch.randint(3, 15, (n,), generator=g).tolist()):
        ids = torch.randint(1, 64, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (1 + i % 3) + ids[1 + i % 3:]})
    return FeatureDataset(out)


def lora_llama(**config):
    return peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **config))


def args(**overrides) -> TrainingArguments:
    base = dict(task="causal-lm", progress_bar=False, tensorboard=False, device="cpu", learning_rate=1e-2)
    return TrainingArguments(**{**base, **overrides})


def test_a_step_over_packed_micro_batches_has_the_token_weighted_loss_of_its_sequences():
    """Accumulated micro-batches of rows with different label counts weigh each label token once
    (the step's loss is measured before its update)."""
    data = sequences(40)
    packed = pack_dataset(data, 16)
    model = lora_llama()
    trainer = Trainer(model, args(batch_size=2, gradient_accumulation_steps=3, max_steps=1),
                      packed, collate_fn=PackedCollator(0))
    trainer._setup()
    order = trainer.batches.order(0)[:6]  # the rows of step 1
    examples = [data[i] for r in order for i in packed.groups[r]]
    with torch.no_grad():  # direct reference: summed cross-entropy of each sequence alone / its targets
        total, count = 0.0, 0
        for e in examples:
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            labels = torch.tensor(e["labels"])
            total += float(torch.nn.functional.cross_entropy(logits[:-1], labels[1:], reduction="sum"))
            count += int((labels[1:] != IGNORE_INDEX).sum())
    result = trainer.train()
    assert result.train_loss == pytest.approx(total / count, abs=1e-5)


def test_an_epoch_is_a_pass_over_the_rows():
    packed = pack_dataset(sequences(40), 16)
    trainer = Trainer(lora_llama(), args(batch_size=3, epochs=2), packed, collate_fn=PackedCollator(0))
    result = trainer.train()
    assert trainer.steps_per_epoch == math.ceil(len(packed) / 3) and len(packed) < 40
    assert result.global_step == 2 * trainer.steps_per_epoch
    assert sorted(trainer.batches.order(1)) == list(range(len(packed)))


def test_unpacked_eval_set_gives_the_same_metrics_as_an_unpacked_run():
    data, held_out = sequences(24), sequences(8, seed=1)
    packed_trainer = Trainer(lora_llama(), args(), pack_dataset(data, 16), held_out, PackedCollator(0))
    plain_trainer = Trainer(lora_llama(), args(), data, held_out, PackedCollator(0))
    assert packed_trainer.evaluate() == plain_trainer.evaluate()


@pytest.mark.filterwarnings("ignore:position_ids are ignored with prompt tuning")
def test_trainer_refuses_packed_rows_for_a_model_that_would_mix_them():
    config = peftkit.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    model = peftkit.get_peft_model(tiny_llama(), config)
    with pytest.raises(ValueError, match="does not keep packed sequences apart"):
        Trainer(model, args(), pack_dataset(sequences(8), 16), collate_fn=PackedCollator(0))


# ------------------------------------------------------------------------------------ kill, resume
def start(out: Path, delay: float, resume: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, str(SCRIPT), str(out), str(delay)] + (["resume"] if resume else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(peftkit.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def test_a_killed_and_resumed_packed_run_logs_the_uninterrupted_curve(tmp_path):
    reference = tmp_path / "reference"
    done = start(reference, 0.0)
    assert done.wait(timeout=120) == 0, done.stderr.read().decode()
    out = tmp_path / "killed"
    kill_after(start(out, 0.03), out, 2)  # inside epoch 0
    kill_after(start(out, 0.03, resume=True), out, 9)  # inside epoch 1
    last = start(out, 0.0, resume=True)
    assert last.wait(timeout=120) == 0, last.stderr.read().decode()
    expected = curve(reference)
    assert len(expected) == 14 + 5  # 7 steps of packed rows per epoch, evals at 3, 6, 9, 12 and 14
    assert curve(out) == expected
