"""Resuming with another split of the global batch (per-device batch x world size x accumulation):
the data position counts examples, so the run continues as if it had never stopped; an epoch-based
run that would change the global batch itself is refused with the settings that keep it."""

import pytest
import torch

from peftkit.train import Trainer, TrainingArguments

from .conftest import TinyClassifier, classification_data


class Crashing(TinyClassifier):
    """Dies inside optimizer step ``crash_at``, after the checkpoint of the step before."""

    def __init__(self, crash_at=None):
        super().__init__()
        self.crash_at = crash_at

    def after_optimizer_step(self, step):
        if step == self.crash_at:
            raise KeyboardInterrupt


def run(out, crash_at=None, resume=False, **kw):
    args = dict(progress_bar=False, tensorboard=False, device="cpu", learning_rate=1e-2, epochs=2, save_steps=1,
                batch_size=8, output_dir=str(out))
    trainer = Trainer(Crashing(crash_at), TrainingArguments(**{**args, **kw}), classification_data(40))
    trainer.train(resume_from=resume)
    return trainer


def params(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


@pytest.mark.parametrize("split", [dict(batch_size=4, gradient_accumulation_steps=2),
                                   dict(batch_size=2, gradient_accumulation_steps=4)])
def test_the_same_global_batch_split_otherwise_continues_the_run(tmp_path, split):
    straight = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash_at=7)  # the checkpoint of step 6 is 1 batch of 8 into epoch 2
    resumed = run(tmp_path / "b", resume=True, **split)
    assert resumed.state["global_step"] == straight.state["global_step"] == 10
    torch.testing.assert_close(params(resumed), params(straight), atol=1e-5, rtol=0)
    curve = {lib: [(r["step"], r["loss"]) for r in t.log.records if "loss" in r] for lib, t in
             (("straight", straight), ("resumed", resumed))}
    assert [s for s, _ in curve["resumed"]] == [s for s, _ in curve["straight"]]
    torch.testing.assert_close([l for _, l in curve["resumed"]], [l for _, l in curve["straight"]], atol=1e-6, rtol=0)


def test_an_epoch_based_run_refuses_another_global_batch_and_says_how_to_keep_it(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, crash_at=3)
    with pytest.raises(ValueError, match=r"takes 8 examples per optimizer step.*this one 4 .*batch_size=8 "
                                         r"\(--batch-size\) or gradient_accumulation_steps=2"):
        run(tmp_path, resume=True, batch_size=4)
    resumed = run(tmp_path, resume=True, batch_size=4, gradient_accumulation_steps=2)  # nothing was changed
    assert resumed.state["global_step"] == 10


def test_a_step_based_run_may_change_the_global_batch(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, crash_at=3, max_steps=6)
    resumed = run(tmp_path, resume=True, max_steps=6, batch_size=4)  # 16 examples in: batch 4 of 4
    assert resumed.state["global_step"] == 6
