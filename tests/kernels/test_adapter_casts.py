"""adapter_casts: the factors in the activations' dtype, kept for one forward pass.

The kept copies must equal a cast per call bit for bit, follow every change of the factors from one
pass to the next (in-place updates, edits through .data, new storage), never be written after they
are handed out, and change nothing in a training run.
"""

import contextlib
import copy

import pytest
import torch
from tiny_models import tiny_llama

from peftkit import LoraConfig, get_peft_model
from peftkit.kernels import adapter_casts as ac
from peftkit.kernels import patch_model
from peftkit.kernels.lora_linear import lora_linear, lora_linear_reference

BF = torch.bfloat16


@pytest.fixture(autouse=True)
def _fresh_cache():
    ac.clear()
    yield
    ac.clear()


def _same(a, b):
    """The same kept copy: each cast hands out its own alias of it."""
    return a is not b and a.data_ptr() == b.data_ptr() and a.shape == b.shape


def _param(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(*shape, generator=g))


def test_outside_a_scope_every_call_casts_afresh():
    p = _param(4, 6)
    a, b = ac.cast(p, BF, 0.5), ac.cast(p, BF, 0.5)
    assert a is not b and torch.equal(a, b) and torch.equal(a, (p.detach() * 0.5).to(BF))


@pytest.mark.parametrize("scale,transpose", [(1.0, False), (0.5, False), (2.0, True)])
def test_inside_a_scope_one_copy_per_pass_equal_to_a_fresh_cast(scale, transpose):
    p, q = _param(5, 7), _param(3, 9, seed=1)
    with ac.scope():
        first = ac.cast(p, BF, scale, transpose)
        assert _same(ac.cast(p, BF, scale, transpose), first)
        assert torch.equal(first, ac.fresh_cast(p.detach(), BF, scale, transpose))
        assert first.is_contiguous() and first.shape == ((7, 5) if transpose else (5, 7))
        ac.cast(q, BF, scale, transpose)
    with ac.scope():  # the next pass: new copies, same values, the old ones untouched
        second = ac.cast(p, BF, scale, transpose)
        assert second.data_ptr() != first.data_ptr() and torch.equal(second, first)  # first is held


def test_the_same_dtype_unscaled_is_the_parameter_itself():
    p = _param(2, 3)
    with ac.scope():
        assert ac.cast(p, torch.float32) is p


def test_changes_between_passes_are_followed_data_edits_included():
    p = _param(4, 4)
    with ac.scope():
        before = ac.cast(p, BF, 2.0)
    with torch.no_grad():
        p.add_(1.0)                       # bumps the version counter (what optimizers do)
    with ac.scope():
        assert torch.equal(ac.cast(p, BF, 2.0), ac.fresh_cast(p.detach(), BF, 2.0))
    p.data.mul_(3.0)                      # bumps none: still followed, since every pass re-makes
    with ac.scope():
        assert torch.equal(ac.cast(p, BF, 2.0), ac.fresh_cast(p.detach(), BF, 2.0))
    assert torch.equal(before, (torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 2.0).to(BF))


def test_changes_within_a_pass_are_followed():
    p = _param(4, 4)
    with ac.scope():
        first = ac.cast(p, BF)
        with torch.no_grad():
            p.mul_(-1.0)
        again = ac.cast(p, BF)
        assert not _same(again, first) and torch.equal(again, ac.fresh_cast(p.detach(), BF))
        p.data = torch.randn(6, 2)        # new storage and shape
        assert torch.equal(ac.cast(p, BF), p.detach().to(BF))


def test_copies_start_on_128_bytes_whatever_the_sizes():
    params = [_param(r, n, seed=i) for i, (r, n) in enumerate([(3, 5), (4, 33), (1, 1), (8, 16), (5, 3)])]
    for _ in range(2):  # the second pass makes them all in one flat buffer
        with ac.scope():
            copies = [ac.cast(p, BF, 0.5) for p in params]
    bases = {c.untyped_storage().data_ptr() for c in copies}
    assert len(bases) == 1
    for p, c in zip(params, copies):
        assert (c.storage_offset() * c.element_size()) % 128 == 0
        assert torch.equal(c, ac.fresh_cast(p.detach(), BF, 0.5))


def test_copies_unread_for_a_pass_are_left_out_then_made_again_when_read():
    used, idle = _param(2, 8), _param(2, 8, seed=1)
    with ac.scope():
        ac.cast(used, BF), ac.cast(idle, BF)
    for _ in range(3):
        with ac.scope():
            ac.cast(used, BF)
    with torch.no_grad():
        idle.add_(1.0)
    with ac.scope():
        assert torch.equal(ac.cast(idle, BF), ac.fresh_cast(idle.detach(), BF))


def _lora_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 12, generator=g).to(BF).requires_grad_()
    w = torch.randn(7, 12, generator=g).to(BF)
    a = torch.nn.Parameter(torch.randn(4, 12, generator=g))
    b = torch.nn.Parameter(torch.randn(7, 4, generator=g))
    return x, w, a, b


def test_two_passes_before_one_backward_keep_their_own_copies():
    """DPO-style: both passes' saved copies survive the second pass (no in-place error), and
    outputs and gradients equal those of casts made per call (no scope) bit for bit."""
    x, w, a, b = _lora_inputs()

    def run(scoped):
        a.grad = b.grad = None
        scope = ac.scope if scoped else contextlib.nullcontext
        with scope():
            y1 = lora_linear(x, w, None, a, b, 0.5)
        with scope():
            y2 = lora_linear(x * 2, w, None, a, b, 0.5)
        (y1.float().sum() + y2.float().pow(2).sum()).backward()
        return y1.detach(), y2.detach(), a.grad.clone(), b.grad.clone()

    for got, want in zip(run(True), run(False)):
        assert torch.equal(got, want)
    torch.testing.assert_close(run(True)[0], lora_linear_reference(x, w, None, a.to(BF), b.to(BF), 0.5),
                               rtol=2e-2, atol=1e-2)


def test_training_is_bit_identical_with_and_without_kept_copies(monkeypatch):
    """bf16 base, float32 adapters, patched (shared q/k/v and gate/up nodes), AdamW: every loss and
    every adapter weight after four steps equal with the cache on and off."""
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    start = get_peft_model(tiny_llama().to(BF), config)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}

    def run(enabled):
        monkeypatch.setattr(ac, "ENABLED", enabled)
        model = copy.deepcopy(start).train()
        patch_model(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(4):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    (losses_on, state_on) = run(True)
    assert len(ac._SERVED) == 2 * 7 * 2                     # the engine's forward kept every factor's copy
    (losses_off, state_off) = run(False)
    assert losses_on == losses_off and losses_on[-1] < losses_on[0]
    assert all(torch.equal(state_on[n], state_off[n]) for n in state_off)
    assert any(p.dtype == torch.float32 for p in state_on.values())


def test_rows_of_back_to_back_copies_are_a_view_and_equal_the_concatenation():
    params = [_param(4, 32, seed=i) for i in range(3)]                # 4 x 32 bf16: 256 bytes, no gaps
    for _ in range(2):                                                # the second pass: one flat buffer
        with ac.scope():
            rows = ac.cast_rows(params, BF)
    want = torch.cat([ac.fresh_cast(p, BF) for p in params])
    assert torch.equal(rows, want) and rows._base is not None
    odd = [_param(3, 5, seed=i) for i in range(3)]                    # 30 bytes each: padded apart
    for _ in range(2):
        with ac.scope():
            rows = ac.cast_rows(odd, BF)
    assert torch.equal(rows, torch.cat([ac.fresh_cast(p, BF) for p in odd])) and rows._base is None
    assert torch.equal(ac.cast_rows(params, BF), want)               # outside a scope: a fresh concatenation


def test_a_pass_reuses_the_last_buffer_when_no_one_holds_its_copies():
    params = [_param(4, 32, seed=i) for i in range(3)]
    buffers = []
    for step in range(4):
        with torch.no_grad():
            params[1].add_(1.0)
        with ac.scope():
            got = [ac.cast(p, BF, 0.5) for p in params]
            assert all(torch.equal(g, ac.fresh_cast(p, BF, 0.5)) for g, p in zip(got, params))
            buffers.append(got[0].untyped_storage().data_ptr())
            del got
    assert buffers[1] == buffers[2] == buffers[3]  # made once (pass 2), then written in place


def test_a_copy_still_held_is_never_written():
    p = _param(4, 32)
    for _ in range(2):
        with ac.scope():
            ac.cast(p, BF)
    with ac.scope():
        held = ac.cast(p, BF)                         # a Python variable keeps it
    kept = held.clone()
    with torch.no_grad():
        p.mul_(-1.0)
    with ac.scope():
        new = ac.cast(p, BF)
    assert torch.equal(held, kept) and torch.equal(new, ac.fresh_cast(p, BF))
    assert new.untyped_storage().data_ptr() != held.untyped_storage().data_ptr()
    rows = None
    with ac.scope():
        rows = ac.cast_rows([p], BF)                  # a row view holds the buffer too
    with torch.no_grad():
        p.add_(3.0)
    with ac.scope():
        ac.cast(p, BF)
    assert torch.equal(rows, new)


def test_a_copy_saved_for_backward_is_never_written():
    """The first pass's graph holds its copies; the factors change before the second pass; the
    first pass's gradients are still those of the factors it ran with."""
    x, w, a, b = _lora_inputs()
    for _ in range(2):                                # the copies in one flat buffer
        with ac.scope():
            lora_linear(x, w, None, a, b, 0.5)
    with ac.scope():
        y = lora_linear(x, w, None, a, b, 0.5)
    a_bf, b_bf = ac.fresh_cast(a, BF), ac.fresh_cast(b, BF, 0.5)
    with torch.no_grad():
        a.mul_(2.0), b.mul_(-3.0)
    with ac.scope():
        lora_linear(x, w, None, a, b, 0.5)
    gy = torch.ones_like(y)
    y.backward(gy)
    x2 = x.detach().reshape(-1, 12)
    torch.testing.assert_close(b.grad, (gy.reshape(-1, 7).t().float() @ (x2 @ a_bf.t()).float()) * 0.5,
                               rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a.grad, ((gy.reshape(-1, 7) @ b_bf).t().float() @ x2.float()), rtol=2e-2, atol=2e-2)


def test_a_pass_that_casts_nothing_does_not_split_the_next_refresh(monkeypatch):
    """A pass of the base alone (a DPO reference pass: adapters disabled) between two: the next pass
    still re-makes every copy at its first cast, in one buffer, not one refresh per copy."""
    params = [_param(4, 32, seed=i) for i in range(5)]
    for _ in range(2):
        with ac.scope():
            [ac.cast(p, BF) for p in params]
    with ac.scope():
        pass                                          # the reference pass: no casts
    calls = []
    real = ac.refresh
    monkeypatch.setattr(ac, "refresh", lambda: calls.append(1) or real())
    with torch.no_grad():
        params[2].add_(1.0)
    with ac.scope():
        got = [ac.cast(p, BF) for p in params]
    assert len(calls) == 1 and len({g.untyped_storage().data_ptr() for g in got}) == 1
    assert all(torch.equal(g, ac.fresh_cast(p, BF)) for g, p in zip(got, params))
