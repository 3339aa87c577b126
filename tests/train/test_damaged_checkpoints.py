"""Resuming from damaged, missing or foreign checkpoints: the trainer falls back to the newest
checkpoint that reads whole (a warning names each skipped one) or stops with a message that says
what is wrong, never with a raw traceback and never silently from step 0."""

import logging
import shutil

import pytest
import torch

import peftkit as pk
from peftkit.train import Trainer, TrainingArguments
from peftkit.train import checkpoint as ckpt
from peftkit.train.metrics import read_metrics
from tiny_models import LinearConv1DNet

from .conftest import TinyClassifier, classification_data

DATA = classification_data(40)  # 10 batches of 4: 4 optimizer steps of <= 3 micro-batches per epoch
RAN: list[str] = []


def args(out, **kw):
    base = dict(output_dir=str(out), progress_bar=False, tensorboard=False, learning_rate=1e-2, device="cpu",
                batch_size=4, gradient_accumulation_steps=3, epochs=3, save_steps=1, save_total_limit=20)
    return TrainingArguments(**{**base, **kw})


def losses(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl")]


def checkpoints(run):
    return {p.name: p for p in ckpt.list_checkpoints(run / "checkpoints")}


def _ran(what):
    RAN.append(what)


class RunsCode:
    def __reduce__(self):
        return (_ran, ("a trainer state file ran code while loading",))


def _truncate(path):
    data = (path / ckpt.STATE_FILE).read_bytes()
    (path / ckpt.STATE_FILE).write_bytes(data[: len(data) // 2])


def _drop(key):
    def damage(path):
        saved = ckpt.load_checkpoint(path)
        saved.pop(key)
        torch.save(saved, path / ckpt.STATE_FILE)
    return damage


DAMAGE = {
    "truncated": (_truncate, "cannot be read"),
    "garbage": (lambda p: (p / ckpt.STATE_FILE).write_bytes(b"\x00garbage" * 50), "cannot be read"),
    "optimizer_missing": (_drop("optimizer"), "lacks optimizer"),
    "rng_missing": (_drop("rng"), "lacks rng"),
    "runs_code": (lambda p: torch.save({"trainable": {}, "x": RunsCode()}, p / ckpt.STATE_FILE), "cannot be read"),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run's loss curve, and a finished run whose every step was checkpointed."""
    root = tmp_path_factory.mktemp("runs")
    Trainer(TinyClassifier(dropout=0.3), args(root / "ref", save_steps=12), DATA).train()
    Trainer(TinyClassifier(dropout=0.3), args(root / "all"), DATA).train()
    return losses(root / "ref"), root / "all"


@pytest.fixture
def killed(reference, tmp_path):
    """A copy of the run as if killed after its step-6 checkpoint, mid-way through a metrics line."""
    run = shutil.copytree(reference[1], tmp_path / "run")
    for name, path in checkpoints(run).items():
        if int(name.split("-")[1]) > 6:
            shutil.rmtree(path)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 8, "lo\xff\xfe')  # a line cut off (and garbled) by the kill
    return run


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(reference, killed, caplog, damage):
    change, said = DAMAGE[damage]
    change(checkpoints(killed)["step-00000006"])
    with caplog.at_level(logging.WARNING, logger="peftkit.train.trainer"):
        result = Trainer(TinyClassifier(dropout=0.3, seed=7), args(killed, save_steps=12), DATA).train(resume_from=True)
    skipped = [r.getMessage() for r in caplog.records if "skipping damaged checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and "step-00000006" in skipped[0] and said in skipped[0], skipped
    assert not RAN
    assert result.global_step == 12
    assert losses(killed) == reference[0]  # resumed from step 5: no step logged twice, none lost


def test_no_readable_checkpoint_is_a_clear_error(killed):
    for path in checkpoints(killed).values():
        _truncate(path)
    with pytest.raises(ValueError, match="no checkpoint is readable.*step-00000006.*step-00000001.*delete"):
        Trainer(TinyClassifier(), args(killed), DATA).train(resume_from=True)


def test_a_damaged_checkpoint_named_explicitly_is_an_error(killed):
    path = checkpoints(killed)["step-00000006"]
    _drop("scheduler")(path)
    with pytest.raises(ValueError, match="lacks scheduler"):
        Trainer(TinyClassifier(), args(killed), DATA).train(resume_from=path)


def test_resume_from_a_folder_without_checkpoints_is_an_error(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        Trainer(TinyClassifier(), args(tmp_path / "new"), DATA).train(resume_from=tmp_path)


def test_resume_true_whose_checkpoints_were_deleted_is_an_error_naming_the_output_dir(killed):
    """As transformers' Trainer: asked to resume, finding nothing to resume from is an error, not a
    silent restart that redoes the run over its log."""
    shutil.rmtree(killed / "checkpoints")
    logged = (killed / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match=f"output directory {str(killed)!r} holds no complete checkpoint.*drop "
                                         "resume_from to train from step 0, or pass resume_from=<a checkpoint"):
        Trainer(TinyClassifier(dropout=0.3), args(killed, save_steps=12), DATA).train(resume_from=True)
    assert (killed / "metrics.jsonl").read_bytes() == logged  # nothing was trained or rewritten


def test_without_resume_a_run_whose_checkpoints_were_deleted_starts_over(reference, killed):
    shutil.rmtree(killed / "checkpoints")
    Trainer(TinyClassifier(dropout=0.3), args(killed, save_steps=12), DATA).train()
    assert losses(killed) == reference[0]  # the old records were dropped, not duplicated


# -- a checkpoint of another adapter ---------------------------------------------------------------
def peft_net(config):
    return pk.get_peft_model(LinearConv1DNet(), config)


def net_data(n=12):
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(8, generator=g), "labels": torch.tensor(i % 4)} for i in range(n)]


@pytest.mark.parametrize("other, said", [
    (pk.LoraConfig(r=8, target_modules=["lin", "gpt"]), r"shape mismatches .*lora_A.*checkpoint \(4, 8\), model \(8, 8\)"),
    (pk.IA3Config(target_modules=["lin", "gpt"], feedforward_modules=[]), r"missing \[.*ia3_l"),
])
def test_checkpoint_of_another_rank_or_method_is_refused_and_the_model_kept(tmp_path, other, said):
    lora = pk.LoraConfig(r=4, target_modules=["lin", "gpt"])
    Trainer(peft_net(lora), args(tmp_path, max_steps=2, epochs=1, gradient_accumulation_steps=1), net_data()).train()
    model = peft_net(other)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=said + ".*resume with the same model, method and options"):
        Trainer(model, args(tmp_path, max_steps=4, epochs=1, gradient_accumulation_steps=1), net_data()).train(
            resume_from=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_crash_inside_the_adapter_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = peft_net(pk.LoraConfig(r=4, target_modules=["lin", "gpt"], init_lora_weights=False))
    good = ckpt.save_checkpoint(tmp_path, 1, model, {"state": {"global_step": 1}})
    real_save = model.save_pretrained

    def killed_half_way(folder, **kwargs):
        real_save(folder, **kwargs)
        (tmp_path / "marker").write_text("the adapter was written; the process dies before the rename")
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_pretrained", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, model, {"state": {"global_step": 2}})
    assert ckpt.list_checkpoints(tmp_path) == [good]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker", good.name]  # no half-written folder
    reloaded = pk.PeftModel.from_pretrained(LinearConv1DNet(), good / "adapter")
    x = torch.randn(3, 8)
    torch.testing.assert_close(reloaded(x)["logits"], model(x)["logits"], atol=0, rtol=0)
