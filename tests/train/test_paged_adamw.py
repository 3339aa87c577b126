"""PagedAdamW: torch.optim.AdamW's update exactly, with the state off the accelerator."""
import copy

import pytest
import torch

from peftkit.train import Trainer, TrainingArguments
from peftkit.train.paged_adamw import PagedAdamW


def run(opt_cls, steps=6, **kwargs):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(3))]
    opt = opt_cls(params, **kwargs)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = None if (step == 2 and i == 1) else torch.randn(p.shape, generator=g)  # one skipped grad
        opt.step()
    return params, opt


@pytest.mark.parametrize("kwargs", [dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6,
                                                                         weight_decay=0.0)])
def test_updates_equal_torch_adamw_bit_for_bit_on_cpu(kwargs):
    ours, opt = run(PagedAdamW, **kwargs)
    theirs, ref = run(lambda p, **k: torch.optim.AdamW(p, foreach=False, **k), **kwargs)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    for a, b in zip(ours, theirs):
        assert torch.equal(opt.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"])
        assert opt.state[a]["step"].item() == ref.state[b]["step"].item()


def test_state_dict_round_trip_continues_identically():
    params, opt = run(PagedAdamW, steps=3, lr=1e-2)
    saved = copy.deepcopy(opt.state_dict())  # as a checkpoint file would hold it
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = PagedAdamW(clone, lr=1e-2)
    opt2.load_state_dict(saved)
    for p, q in zip(params, clone):
        p.grad = q.grad = torch.ones_like(p)
    opt.step()
    opt2.step()
    assert all(torch.equal(p, q) for p, q in zip(params, clone))
    assert all(opt2.state[q]["exp_avg"].device.type == "cpu" for q in clone)


def test_trainer_uses_it_when_asked_and_refuses_unknown_names():
    model = torch.nn.Linear(3, 1)
    args = TrainingArguments(optim="paged_adamw_32bit", progress_bar=False, tensorboard=False, device="cpu")
    trainer = Trainer(model, args)
    assert isinstance(trainer._make_optimizer(list(model.parameters())), PagedAdamW)
    with pytest.raises(ValueError, match="optim"):
        TrainingArguments(optim="lion")
    with pytest.raises(ValueError, match="betas"):
        PagedAdamW(model.parameters(), betas=(1.0, 0.9))


@pytest.mark.parametrize("chunk_bytes", [1, 200])
def test_chunks_of_any_size_give_the_same_update_and_bad_budget_is_refused(chunk_bytes):
    whole, _ = run(PagedAdamW, lr=1e-2, weight_decay=0.1)
    chunked, _ = run(lambda p, **k: PagedAdamW(p, chunk_bytes=chunk_bytes, **k), lr=1e-2, weight_decay=0.1)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))
    with pytest.raises(ValueError, match="chunk_bytes"):
        PagedAdamW(whole, chunk_bytes=0)


def test_parameters_of_two_dtypes_are_updated_in_separate_chunks():
    from peftkit.train.paged_adamw import _chunks

    a, b, c = torch.zeros(4), torch.zeros(4, dtype=torch.float64), torch.zeros(2)
    assert [[id(t) for t in chunk] for chunk in _chunks([a, c, b], 1 << 20)] == [[id(a), id(c)], [id(b)]]
    assert [len(chunk) for chunk in _chunks([a, c], 2 * 4 * 4)] == [1, 1]  # a's m and v fill the budget
