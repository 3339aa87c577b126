"""The training loop on tiny plain-PyTorch models: accumulation, clipping, eval, early stopping, best."""

import json

import pytest
import torch

from peftkit.train import Trainer, TrainingArguments
from peftkit.train import checkpoint as ckpt

from .conftest import TinyClassifier, TinyLM, classification_data, lm_data


def args(**kw):
    base = dict(progress_bar=False, tensorboard=False, learning_rate=1e-2, device="cpu")
    return TrainingArguments(**{**base, **kw})


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("bad", [dict(learning_rate=0), dict(batch_size=0), dict(precision="fp8"),
                                 dict(lr_scheduler="step"), dict(warmup_ratio=1.0), dict(max_steps=-1)])
def test_arguments_are_validated_on_construction(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainingArguments(**bad)


def test_accumulation_matches_one_big_batch_for_classification():
    big, small = TinyClassifier(), TinyClassifier()
    data = classification_data(32)
    Trainer(big, args(batch_size=8, max_steps=4, lr_scheduler="constant"), data).train()
    Trainer(small, args(batch_size=4, gradient_accumulation_steps=2, max_steps=4, lr_scheduler="constant"), data).train()
    torch.testing.assert_close(params(big), params(small), rtol=0, atol=1e-6)


def test_accumulation_weights_micro_batches_by_label_tokens_for_causal_lm():
    """Micro-batches with different numbers of label tokens still add up to the big batch's mean."""
    big, small = TinyLM(), TinyLM()
    data = lm_data(16)
    common = dict(task="causal-lm", max_steps=2, lr_scheduler="constant", max_grad_norm=None)
    Trainer(big, args(batch_size=8, **common), data).train()
    Trainer(small, args(batch_size=2, gradient_accumulation_steps=4, **common), data).train()
    torch.testing.assert_close(params(big), params(small), rtol=0, atol=1e-6)


class SGDTrainer(Trainer):
    def _make_optimizer(self, params):
        return torch.optim.SGD(params, lr=self.args.learning_rate)


def test_clipping_limits_the_update_to_lr_times_max_norm():
    model = TinyClassifier()
    before = params(model)
    t = SGDTrainer(model, args(batch_size=16, max_steps=1, learning_rate=1.0, max_grad_norm=1e-3,
                               lr_scheduler="constant"), classification_data(16))
    t.train()
    assert (params(model) - before).norm().item() == pytest.approx(1e-3, rel=1e-4)
    assert t.log.records[0]["grad_norm"] > 1e-3  # the logged norm is the one before clipping


def test_epochs_cover_every_example_once_per_epoch_in_a_seeded_order():
    seen = []

    def collate(items):
        seen.extend(int(i["id"]) for i in items)
        return {"x": torch.stack([i["x"] for i in items]), "labels": torch.stack([i["labels"] for i in items])}

    data = [{**d, "id": i} for i, d in enumerate(classification_data(20))]
    t = Trainer(TinyClassifier(), args(batch_size=6, epochs=2), data, collate_fn=collate)
    result = t.train()
    assert result.global_step == 2 * 4  # ceil(20 / 6) steps per epoch
    assert sorted(seen[:20]) == list(range(20)) and sorted(seen[20:]) == list(range(20))
    assert seen[:20] != seen[20:]  # each epoch has its own shuffle


def test_eval_reports_accuracy_f1_and_is_logged(tmp_path):
    data = classification_data(96)
    t = Trainer(TinyClassifier(), args(output_dir=str(tmp_path), task="classification", batch_size=8,
                                       epochs=3, eval_steps=6), data[:64], data[64:])
    result = t.train()
    assert set(result.eval_metrics) == {"loss", "accuracy", "f1"}
    assert result.eval_metrics["accuracy"] > 0.8
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_accuracy" in r] == [6, 12, 18, 24]
    assert (tmp_path / "training_curves.png").stat().st_size > 1000


def test_causal_lm_eval_reports_loss_and_perplexity():
    t = Trainer(TinyLM(), args(task="causal-lm"), eval_dataset=lm_data(8), collate_fn=None)
    metrics = t.evaluate()
    assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-6)


def test_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path):
    data = classification_data(64)
    t = Trainer(TinyClassifier(), args(output_dir=str(tmp_path), task="classification", learning_rate=1e-9,
                                       batch_size=8, epochs=5, eval_steps=2, early_stopping_patience=2,
                                       metric_for_best="loss"), data, data[:16])
    result = t.train()
    assert result.stopped_early and result.global_step == 6  # best at 2, then 4 and 6 are no better
    assert result.best_step == 2
    assert (tmp_path / "best" / ckpt.STATE_FILE).is_file()


def test_load_best_at_end_restores_the_best_weights(tmp_path):
    data = classification_data(64)
    model = TinyClassifier()
    t = Trainer(model, args(task="classification", batch_size=8, epochs=2, eval_steps=1, learning_rate=0.5,
                            metric_for_best="loss", load_best_at_end=True), data, data[:32])
    result = t.train()
    assert t.evaluate()["loss"] == pytest.approx(result.best_metric)


def test_hooks_are_called_every_step():
    class Hooked(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.steps = []

        def adapter_loss(self):
            return 100.0 * self.net[0].weight.pow(2).sum()

        def after_optimizer_step(self, global_step):
            self.steps.append(global_step)

    model = Hooked()
    t = Trainer(model, args(batch_size=8, max_steps=3, gradient_accumulation_steps=2), classification_data(64))
    norm0 = model.net[0].weight.norm().item()
    t.train()
    assert model.steps == [1, 2, 3]
    assert model.net[0].weight.norm().item() < norm0  # the extra loss pulled the weights down


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_precisions_train(precision):
    model = TinyClassifier()
    before = params(model)
    result = Trainer(model, args(batch_size=8, max_steps=3, precision=precision), classification_data(32)).train()
    assert result.global_step == 3 and torch.isfinite(params(model)).all()
    assert not torch.equal(before, params(model))


def test_gradient_checkpointing_calls_the_model_switch():
    class Switchable(TinyClassifier):
        kwargs = None

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.kwargs = gradient_checkpointing_kwargs

    model = Switchable()
    Trainer(model, args(batch_size=8, max_steps=1, gradient_checkpointing=True), classification_data(8)).train()
    assert model.kwargs == {"use_reentrant": False}
    with pytest.raises(ValueError, match="gradient_checkpointing_enable"):
        Trainer(TinyClassifier(), args(max_steps=1, gradient_checkpointing=True), classification_data(8)).train()


def test_frozen_model_and_empty_data_are_refused():
    frozen = TinyClassifier().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(frozen, args(max_steps=1), classification_data(8)).train()
    with pytest.raises(ValueError, match="empty"):
        Trainer(TinyClassifier(), args(max_steps=1), []).train()
