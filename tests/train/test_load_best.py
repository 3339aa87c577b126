"""load_best_at_end restores the methods' state with the parameters: the model after training is the
one a resume from the best step's checkpoint gives (AdaLoRA's masks, scores and rank pattern; diff
pruning's fixed masks), not the best parameters under the last step's masks."""
from __future__ import annotations

import warnings

import pytest
import torch

from peftkit import AdaLoraConfig, DiffPruningConfig, get_peft_model
from peftkit.train import Trainer, TrainingArguments
from peftkit.train import checkpoint as ckpt
from tiny_models import LinearConv1DNet

STEPS = 8
CONFIGS = {  # masks change over the run: AdaLoRA prunes from step 1, diff pruning projects at step 5
    "adalora": lambda: AdaLoraConfig(target_modules=["lin", "gpt"], init_r=6, target_r=2, total_step=STEPS,
                                     tinit=0, tfinal=2, deltaT=1, lora_alpha=4),
    "diff_pruning": lambda: DiffPruningConfig(target_modules=["lin", "gpt"], total_step=STEPS, fixed_mask_steps=3,
                                              target_density=0.1, init_diff_weights=False),
}


def examples(shift: int) -> list[dict]:
    """Random inputs and labels; eval uses the labels shifted by one, so training makes it worse and
    the best evaluation comes early."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    return [{"x": x[i], "labels": (y[i] + shift) % 4} for i in range(32)]


def same(a, b) -> bool:
    """Nested dicts, lists and tuples of tensors and plain values are equal, tensors bit for bit."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_load_best_at_end_gives_the_model_a_resume_from_the_best_step_gives(tmp_path, method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out is corrected per layer type
        model = get_peft_model(LinearConv1DNet(0), CONFIGS[method]())
    args = TrainingArguments(progress_bar=False, tensorboard=False, device="cpu", learning_rate=5e-2, batch_size=8,
                             max_steps=STEPS, eval_steps=1, save_total_limit=STEPS, metric_for_best="loss",
                             load_best_at_end=True, output_dir=str(tmp_path))
    result = Trainer(model, args, examples(0), examples(1)).train()
    steps = tmp_path / "checkpoints"
    best, last = (ckpt.load_checkpoint(steps / f"{ckpt.PREFIX}{s:08d}") for s in (result.best_step, STEPS))
    assert not same(best["method"], last["method"])  # the masks moved after the best step
    assert same(model.training_state(), best["method"])
    assert same(ckpt.trainable_state(model), best["trainable"])
    if method == "adalora":
        assert model.peft_config["default"].rank_pattern == best["method"]["default"]["rank_pattern"]
