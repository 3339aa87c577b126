"""The properties every method must have (shared/PROPERTIES.md), over three model families."""
from __future__ import annotations

import copy
import json
import pickle
import warnings

import pytest
import torch

from method_cases import CASES
from peftkit import PeftConfig, PeftModel, get_peft_model
from peftkit.engine.layer import AdapterLayer, ModulesToSave
from tiny_models import FAMILIES, logits, model_inputs


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request):
    return request.param


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def build(family, case, identity=False, seed=0, **overrides):
    builder, targets, task = FAMILIES[family]
    base = builder(seed)
    return get_peft_model(base, case.config(targets, task, identity, **overrides))


def fresh_base(family, seed=0):
    return FAMILIES[family][0](seed)


def add_second(model, family, case, name="other", **overrides):
    _, targets, task = FAMILIES[family]
    torch.manual_seed(123)
    if case.trains_one_adapter:  # a second trainable one is refused; it may be added to use
        with pytest.raises(ValueError, match="inference_mode=True"):
            model.add_adapter(name, case.config(targets, task, identity=False, **overrides))
        overrides = {"inference_mode": True, **overrides}
    model.add_adapter(name, case.config(targets, task, identity=False, **overrides))


def adapter_params(model, name="default"):
    """The adapter's own tensors, found through the layers that own them (never by name)."""
    own = {id(t) for _, layer in model.base_model.adapter_layers() if not isinstance(layer, ModulesToSave)
           and name in layer.adapter_names() for t in layer.adapter_tensors(name).values()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in own]


def train_steps(model, inputs, steps=3, lr=1e-2):
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        out = model(**inputs)
        out.logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()


# 1 ------------------------------------------------------------------------------------------
def test_identity_init_changes_nothing_and_random_init_does(family, case):
    x = model_inputs()
    ref = logits(fresh_base(family), x)
    if case.identity_init:
        assert torch.equal(logits(build(family, case, identity=True), x), ref)
    out = logits(build(family, case, identity=False), x)
    out = out[:, -ref.shape[1]:] if out.dim() == 3 else out  # prompt tuning adds positions in front
    assert not torch.allclose(out, ref, atol=1e-4)


# 2, 3 ---------------------------------------------------------------------------------------
def test_merge_unmerge_and_merge_and_unload_agree(family, case, tmp_path):
    if not case.can_merge:
        pytest.skip(f"{case.name} declares it cannot merge")
    model, x = build(family, case), model_inputs()
    before = logits(model, x)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, x), before, atol=1e-4, rtol=1e-4)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, x), before, atol=1e-4, rtol=1e-4)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert not hasattr(plain, "peft_config") or not plain.peft_config
    torch.testing.assert_close(logits(plain, x), before, atol=1e-4, rtol=1e-4)
    if family == "llama" and case.extra.get("merged_reload_drops_created_biases"):
        return  # declared: the tiny Llama's config has no biases, so transformers drops merged-in ones
    plain.save_pretrained(tmp_path / "merged")
    reloaded = type(plain).from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(reloaded, x), logits(plain, x), atol=0, rtol=0)


# 4 ------------------------------------------------------------------------------------------
def test_merging_twice_warns_and_changes_nothing(family, case):
    if not case.can_merge:
        pytest.skip(f"{case.name} declares it cannot merge")
    model, x = build(family, case), model_inputs()
    model.merge_adapter()
    once = logits(model, x)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    assert torch.equal(logits(model, x), once)


def test_safe_merge_matches_and_refuses_nan(family, case):
    if not case.can_merge:
        pytest.skip(f"{case.name} declares it cannot merge")
    x = model_inputs()
    plain = build(family, case)
    plain.merge_adapter()
    safe = build(family, case)
    safe.merge_adapter(safe_merge=True)
    assert torch.equal(logits(safe, x), logits(plain, x))
    broken = build(family, case)
    before = {k: v.clone() for k, v in broken.state_dict().items()}
    name, param = adapter_params(broken)[0]
    with torch.no_grad():
        param.view(-1)[0] = float("nan")  # first entry, whatever the tensor's rank (BitFit's are 1-D)
    with pytest.raises(ValueError, match="'default'"):
        broken.merge_adapter(safe_merge=True)
    after = broken.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != name)


# 5 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_bases_run_and_merge(family, case, dtype):
    model = build(family, case)
    model.get_base_model().to(dtype)
    x = model_inputs()
    out = logits(model, x)
    assert out.dtype == dtype
    adapter_dtypes = {p.dtype for _, p in adapter_params(model)}
    assert adapter_dtypes and adapter_dtypes <= {torch.float32, dtype}
    if case.can_merge:
        model.merge_adapter()
        merged = logits(model, x)
        assert merged.dtype == dtype and torch.isfinite(merged).all()
        torch.testing.assert_close(merged.float(), out.float(), atol=0.1, rtol=0.05)


# 6 ------------------------------------------------------------------------------------------
def test_several_adapters_switch_exactly(family, case):
    model, x = build(family, case), model_inputs()
    first = logits(model, x)
    add_second(model, family, case)
    assert torch.equal(logits(model, x), first)  # adding does not activate
    model.set_adapter("other")
    second = logits(model, x)
    assert not torch.allclose(second, first, atol=1e-4)
    model.set_adapter("default")
    assert torch.equal(logits(model, x), first)


def test_merging_a_subset_gives_that_subset(family, case):
    if not case.can_merge:
        pytest.skip(f"{case.name} declares it cannot merge")
    model, x = build(family, case), model_inputs()
    add_second(model, family, case)
    model.set_adapter("other")
    other = logits(model, x)
    model.merge_adapter(["other"])
    torch.testing.assert_close(logits(model, x), other, atol=1e-4, rtol=1e-4)


def test_two_active_adapters_add_their_deltas(family, case):
    model, x = build(family, case), model_inputs()
    add_second(model, family, case)
    if not case.stacks:
        with pytest.raises(ValueError, match="cannot be active together"):
            model.set_adapter(["default", "other"])
        assert model.active_adapters == ["default"]
        return
    base = logits(fresh_base(family), x)
    model.set_adapter(["default", "other"])
    both = logits(model, x)
    model.set_adapter("default")
    one = logits(model, x)
    assert not torch.allclose(both, one, atol=1e-4) and not torch.allclose(both, base, atol=1e-4)


# 7 ------------------------------------------------------------------------------------------
def test_save_load_round_trip(family, case, tmp_path):
    model, x = build(family, case), model_inputs()
    train_steps(model, x, steps=1)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(fresh_base(family), tmp_path)
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-5, rtol=1e-5)
    if case.saves_folded:  # the reload holds the encoder's output, so its tensors differ by design
        return
    ours = {k: v for k, v in model.state_dict().items()}
    theirs = loaded.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_saved_file_holds_no_base_weights(family, case, tmp_path):
    from safetensors.torch import load_file

    model = build(family, case)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if case.saves_folded:  # the encoder's output (and any head copy), never more than what trains
        assert 0 < sum(t.numel() for t in saved.values()) <= trainable
        return
    assert sum(t.numel() for t in saved.values()) == trainable


def test_inspect_finds_every_saved_adapter_tensor(family, case, tmp_path):
    """Each layer declares its file tensor names (`file_tensors`); `peftkit inspect`, which has no
    model, counts exactly the saved adapter tensors as the adapter's own through them."""
    from peftkit.cli.inspect import inspect, summary

    model = build(family, case)
    for _, layer in model.base_model.adapter_layers():
        if not isinstance(layer, ModulesToSave):
            keys = layer.saved_tensors("default")
            assert keys and all(k.split(".")[0] in type(layer).file_tensors for k in keys), (type(layer), list(keys))
    model.save_pretrained(tmp_path)
    own = sum(t.numel() for _, layer in model.base_model.adapter_layers() if not isinstance(layer, ModulesToSave)
              for t in layer.saved_tensors("default").values())
    report = summary(inspect(tmp_path))
    assert report["adapter_parameters"] == own
    assert not [p for p in report["problems"] if "modules_to_save" not in p]


# 8 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model", "base", "lora", "layers", "q"])
def test_adapter_names_change_nothing_but_names(family, case, name, tmp_path):
    x = model_inputs()
    builder, targets, task = FAMILIES[family]
    torch.manual_seed(5)
    a = get_peft_model(builder(0), case.config(targets, task), adapter_name="default")
    torch.manual_seed(5)
    b = get_peft_model(builder(0), case.config(targets, task), adapter_name=name)
    assert torch.equal(logits(a, x), logits(b, x))
    b.save_pretrained(tmp_path, selected_adapters=[name])
    c = PeftModel.from_pretrained(builder(0), tmp_path / name, adapter_name=name)
    assert torch.equal(logits(c, x), logits(a, x))


# 9 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapter_gives_base_output_and_restores(family, case, merged):
    if merged and not case.can_merge:
        pytest.skip(f"{case.name} declares it cannot merge")
    model, x = build(family, case), model_inputs()
    base = logits(fresh_base(family), x)
    adapted = logits(model, x)
    if merged:
        model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, x), base, atol=1e-5 if merged else 0, rtol=1e-5 if merged else 0)
    torch.testing.assert_close(logits(model, x), adapted, atol=1e-4, rtol=1e-4)
    assert any(l.merged for _, l in model.base_model.adapter_layers()) == merged


# 10 -----------------------------------------------------------------------------------------
def test_training_moves_every_adapter_tensor_and_no_base_tensor(family, case):
    model, x = build(family, case, identity=True), model_inputs()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, x, steps=3)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), f"adapter tensor {n} did not train"
        else:
            assert torch.equal(p, before[n]), f"frozen tensor {n} changed"
    if FAMILIES[family][2] == "SEQ_CLS":
        assert any("modules_to_save" in n and p.requires_grad for n, p in model.named_parameters())


# 11 -----------------------------------------------------------------------------------------
def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_requires_grad_follows_add_switch_and_load(family, case, tmp_path):
    model = build(family, case)
    first = trainable_names(model)
    assert first and all(".default" in n for n in first)
    add_second(model, family, case)
    assert trainable_names(model) == first
    model.set_adapter("other")
    if case.trains_one_adapter:  # added in inference mode: active, yet frozen
        assert trainable_names(model) == set()
        other = {n.replace(".default", ".other") for n in first}
    else:
        other = trainable_names(model)
        assert other and all(".other" in n for n in other)
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    frozen = PeftModel.from_pretrained(fresh_base(family), tmp_path / "other")
    assert trainable_names(frozen) == set()
    if case.saves_folded:  # the encoder is not in the file: a trainable load says so and how to go on
        with pytest.raises(ValueError, match="is_trainable=False"):
            PeftModel.from_pretrained(fresh_base(family), tmp_path / "other", is_trainable=True)
        return
    training = PeftModel.from_pretrained(fresh_base(family), tmp_path / "other", is_trainable=True)
    assert trainable_names(training) == {n.replace(".other", ".default") for n in other}


# 12 -----------------------------------------------------------------------------------------
def test_mixed_batch_equals_rows_run_alone(family, case):
    if not case.supports_mixed_batch:
        pytest.skip(f"{case.name} declares no mixed-batch support")
    model, x = build(family, case), model_inputs(batch=3)
    add_second(model, family, case)
    names = ["default", "__base__", "other"]
    with torch.no_grad():
        mixed = model(**x, adapter_names=names).logits
    for row, name in enumerate(names):
        single = {k: v[row:row + 1] for k, v in x.items()}
        if name == "__base__":
            with model.disable_adapter():
                alone = logits(model, single)
        else:
            model.set_adapter(name)
            alone = logits(model, single)
        torch.testing.assert_close(mixed[row:row + 1], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown adapter"):
        model(**x, adapter_names=["default", "nope", "other"])
    with pytest.raises(ValueError, match="rows"):
        model(**x, adapter_names=["default"])


def test_mixed_batch_generate(case):
    if not case.supports_mixed_batch:
        pytest.skip(f"{case.name} declares no mixed-batch support")
    model, x = build("llama", case), model_inputs(batch=2, length=4)
    add_second(model, "llama", case)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    mixed = model.generate(**x, adapter_names=["other", "default"], **kwargs)
    for row, name in enumerate(["other", "default"]):
        model.set_adapter(name)
        alone = model.generate(**{k: v[row:row + 1] for k, v in x.items()}, **kwargs)
        assert torch.equal(mixed[row:row + 1], alone)


# 13 -----------------------------------------------------------------------------------------
def test_delete_adapter_removes_every_trace(family, case):
    model = build(family, case)
    add_second(model, family, case)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any(".other" in n for n, _ in model.named_parameters())
    assert not any(".other" in n for n in model.state_dict())


def test_deleting_a_merged_adapter_raises_and_changes_nothing(family, case):
    if not case.can_merge:
        pytest.skip(f"{case.name} declares it cannot merge")
    model, x = build(family, case), model_inputs()
    model.merge_adapter()
    before = logits(model, x)
    with pytest.raises(ValueError, match="unmerge"):
        model.delete_adapter("default")
    assert "default" in model.peft_config and torch.equal(logits(model, x), before)


# 16 -----------------------------------------------------------------------------------------
def test_config_round_trips(family, case, tmp_path):
    _, targets, task = FAMILIES[family]
    config = case.config(targets, task)
    assert type(config).from_dict(config.to_dict()) == config
    assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert copy.deepcopy(config) == config and pickle.loads(pickle.dumps(config)) == config
    config.save_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(tmp_path) == config
    data = config.to_dict() | {"a_field_from_the_future": 1}
    with pytest.warns(UserWarning, match="a_field_from_the_future"):
        assert type(config).from_dict(data) == config


# 17 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_reaches_adapters(case, reentrant):
    model, x = build("llama", case, identity=True), model_inputs()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    if not case.gradient_checkpointing:
        with pytest.raises(ValueError, match="gradient checkpointing"):
            model(**x, labels=x["input_ids"])
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(**x, labels=x["input_ids"]).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
