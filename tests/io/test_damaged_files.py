"""Every registered method's adapter, saved for real and then damaged: loading refuses it with a
message naming the file or tensor and the fix, and leaves the model exactly as it was (modules,
parameter values, ``requires_grad``, forward hooks such as gradient checkpointing's input-grad hook,
adapters, active adapter, outputs).

Decisions recorded here: NaN/inf values are refused (``strict=False`` loads them with a warning
naming the tensor); config fields this version does not know warn and load (HF adds fields in
every release, and PROPERTIES.md 16 asks for a newer file to load); a wrong type or value of a
known field is refused, naming the file and the field; ``adapter_model.bin`` is read with
``weights_only=True``, so a pickle of anything but tensors is refused and never run.
"""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit as pk
from method_cases import CASES
from peftkit.registry import get_method, list_methods
from tiny_models import logits, model_inputs, tiny_llama

WEIGHTS, CONFIG, LEGACY = "adapter_model.safetensors", "adapter_config.json", "adapter_model.bin"
TARGETS = ["q_proj", "v_proj", "down_proj"]
BY_NAME = {case.name: case for case in CASES}


def method_config(name: str):
    """A non-identity config of method ``name`` for tiny_llama: its contract-suite row, or (for a
    method without one, e.g. ptuning_v2) its config class with defaults."""
    if name in BY_NAME:
        return BY_NAME[name].config(TARGETS, "CAUSAL_LM", identity=False)
    return get_method(name).config_cls(task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """method -> a folder holding a real adapter of it (built once; tests damage copies)."""
    root = tmp_path_factory.mktemp("adapters")
    folders = {}
    for name in list_methods():
        torch.manual_seed(0)
        pk.get_peft_model(tiny_llama(), method_config(name)).save_pretrained(root / name)
        folders[name] = root / name
    return folders


@pytest.fixture(params=list_methods())
def method(request):
    return request.param


@pytest.fixture
def copy(saved, method, tmp_path):
    return shutil.copytree(saved[method], tmp_path / method)


# -- damage ------------------------------------------------------------------------------------
def edit_weights(change):
    def damage(folder):
        state = load_file(str(folder / WEIGHTS))
        change(state)
        save_file(state, str(folder / WEIGHTS))
    return damage


def edit_config(change):
    def damage(folder):
        data = json.loads((folder / CONFIG).read_text())
        change(data)
        (folder / CONFIG).write_text(json.dumps(data))
    return damage


def _float_key(state):
    return sorted(k for k, v in state.items() if v.is_floating_point())[0]


def _reshape(state):
    key = _float_key(state)
    state[key] = torch.zeros(*[n + 1 for n in state[key].shape])


def _as_int(state):
    key = _float_key(state)
    state[key] = torch.ones(state[key].shape, dtype=torch.int32)


def _poison(value):
    def change(state):
        key = _float_key(state)
        state[key] = state[key].clone()
        state[key].view(-1)[0] = value
    return change


def _truncate(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def _to_bin(write):
    def damage(folder):
        write(folder / LEGACY, load_file(str(folder / WEIGHTS)))
        (folder / WEIGHTS).unlink()
    return damage


RAN: list[str] = []


def _ran(what: str) -> None:
    RAN.append(what)


class RunsCode:
    """Unpickling this calls ``_ran``: a loader that unpickles arbitrary objects would run it."""

    def __reduce__(self):
        return (_ran, ("an adapter file ran code while loading",))


# name -> (damage, what the ValueError must say: a regex; "{file}" is the damaged file's path)
WEIGHT_DAMAGE = {
    "truncated": (_truncate, r"{file} is corrupt or truncated"),
    "garbage": (lambda f: (f / WEIGHTS).write_bytes(b"\xff" * 64), r"{file} is corrupt or truncated"),
    "bad_header": (lambda f: (f / WEIGHTS).write_bytes((40).to_bytes(8, "little") + b"{not json" + b" " * 40),
                   r"{file} is corrupt or truncated"),
    "wrong_shape": (edit_weights(_reshape), r"shape or dtype mismatch \(1\): \S+: file has shape"),
    "int_dtype": (edit_weights(_as_int), r"shape or dtype mismatch \(1\): \S+: file has dtype int32, model has float32"),
    "nan": (edit_weights(_poison(float("nan"))), r"NaN or infinite values \(1\): \S+.*diverged"),
    "inf": (edit_weights(_poison(float("inf"))), r"NaN or infinite values \(1\): \S+"),
    "missing_tensor": (edit_weights(lambda s: s.pop(sorted(s)[0])), r"missing from the file \(1\): \S+"),
    "extra_tensor": (edit_weights(lambda s: s.__setitem__("base_model.model.nowhere.lora_A.weight", torch.zeros(2))),
                     r"in the file but not in the model \(1\): base_model.model.nowhere.lora_A.weight"),
    "bin_with_code": (_to_bin(lambda p, s: torch.save({**s, "x": RunsCode()}, p)),
                      r"{bin} holds pickled Python objects besides tensors.*not unpickle"),
    "bin_not_a_dict": (_to_bin(lambda p, s: torch.save(list(s.values()), p)), r"{bin} must hold a dict .* found list"),
    "bin_garbage": (_to_bin(lambda p, s: p.write_bytes(b"PK\x03\x04 not a zip archive")), r"{bin} is corrupt or not a tensor file"),
}
CONFIG_DAMAGE = {
    "not_json": (lambda f: (f / CONFIG).write_text('{"peft_type": '), r"{config} is not valid JSON"),
    "not_an_object": (lambda f: (f / CONFIG).write_text("[1, 2]"), r"{config} must hold a JSON object"),
    "binary": (lambda f: (f / CONFIG).write_bytes(b"\xff\xfe\x00garbage"), r"{config} is not valid JSON"),
    "unknown_peft_type": (edit_config(lambda d: d.update(peft_type="NOT_A_METHOD")),
                          r"{config}: .*peft_type='NOT_A_METHOD'.*known: .*LORA"),
    "wrong_type": (edit_config(lambda d: d.update(task_type=7)), r"{config}: task_type=7 is invalid"),
    "invalid_value": (edit_config(lambda d: d.update(task_type="TRANSLATE")),
                      r"{config}: task_type='TRANSLATE' is invalid: expected one of"),
}


def snapshot(model):
    """Everything a failed load must leave alone."""
    params = {k: (p.detach().clone(), p.requires_grad) for k, p in model.named_parameters()}
    peft = getattr(model, "peft_config", None)
    active = model.active_adapters if peft is not None else None
    return ([(k, type(m)) for k, m in model.named_modules()], params, sorted(peft or {}), active,
            logits(model, model_inputs()), forward_hooks(model))


def forward_hooks(model):
    """module -> its forward hooks, and the handles transformers keeps for its input-grad hooks."""
    hooks = {k: list(m._forward_hooks) for k, m in model.named_modules() if m._forward_hooks}
    return hooks, [id(h) for h in getattr(model, "_require_grads_hooks", [])]


def assert_unchanged(model, before):
    modules, params, adapters, active, out, hooks = before
    now = snapshot(model)
    assert now[0] == modules, "a wrapper was left behind or removed"
    assert now[1].keys() == params.keys()
    for key, (value, grad) in params.items():
        assert torch.equal(now[1][key][0], value), f"{key} changed"
        assert now[1][key][1] == grad, f"{key}.requires_grad changed from {grad}"
    assert (now[2], now[3]) == (adapters, active)
    torch.testing.assert_close(now[4], out, atol=0, rtol=0)
    assert now[5] == hooks, "a forward hook was left behind or removed"


def expected(pattern: str, folder) -> str:
    import re

    paths = {"file": folder / WEIGHTS, "bin": folder / LEGACY, "config": folder / CONFIG}
    for name, path in paths.items():
        pattern = pattern.replace("{" + name + "}", re.escape(str(path)))
    return "(?s)" + pattern


# -- PeftModel.from_pretrained ---------------------------------------------------------------------
@pytest.mark.parametrize("damage", sorted({**WEIGHT_DAMAGE, **CONFIG_DAMAGE}))
def test_damaged_adapter_is_refused_and_the_base_model_is_untouched(copy, damage):
    change, pattern = {**WEIGHT_DAMAGE, **CONFIG_DAMAGE}[damage]
    change(copy)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=expected(pattern, copy)) as err:
        pk.PeftModel.from_pretrained(model, copy)
    assert "\n" not in str(err.value) or "fix:" in str(err.value)  # one line, or a listing that ends in the fix
    assert not RAN
    assert_unchanged(model, before)


@pytest.mark.parametrize("checkpointing", ["off", "on", "on, input grads already enabled"])
def test_a_failed_load_under_gradient_checkpointing_leaves_the_input_grad_hook_as_it_was(copy, checkpointing):
    """from_pretrained enables input grads under gradient checkpointing; a load that then fails
    must not leave that hook behind (nor drop one the user had)."""
    WEIGHT_DAMAGE["wrong_shape"][0](copy)  # found after the adapter's layers exist
    model = tiny_llama()
    if checkpointing != "off":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if checkpointing == "on, input grads already enabled":
        model.enable_input_require_grads()
    before = snapshot(model)
    with pytest.raises(ValueError, match="file has shape"):
        pk.PeftModel.from_pretrained(model, copy)
    assert_unchanged(model, before)


@pytest.mark.parametrize("damage", sorted(WEIGHT_DAMAGE))
def test_damaged_second_adapter_leaves_the_first_as_it_was(saved, copy, method, damage):
    change, pattern = WEIGHT_DAMAGE[damage]
    change(copy)
    trainable = not getattr(BY_NAME.get(method), "saves_folded", False)  # P-tuning files load for inference
    model = pk.PeftModel.from_pretrained(tiny_llama(), saved[method], is_trainable=trainable)
    before = snapshot(model)
    with pytest.raises(ValueError, match=expected(pattern, copy)):
        # AdaLoRA trains one adapter at a time: its second one loads for inference
        model.load_adapter(copy, adapter_name="second", is_trainable=trainable and method != "adalora")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert_unchanged(model, before)


def test_folder_problems_name_the_folder(copy):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(NotADirectoryError, match="is a file, not an adapter folder"):
        pk.PeftModel.from_pretrained(model, copy / WEIGHTS)
    (copy / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=f"no {WEIGHTS} .* in {copy}"):
        pk.PeftModel.from_pretrained(model, copy)
    for path in copy.iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match=f"no {CONFIG} in {copy}"):
        pk.PeftModel.from_pretrained(model, copy)
    assert_unchanged(model, before)


# -- what loads (with a warning) -------------------------------------------------------------------
def test_nan_adapter_loads_with_strict_false_and_a_warning_naming_the_tensor(copy):
    edit_weights(_poison(float("nan")))(copy)
    key = _float_key(load_file(str(copy / WEIGHTS)))
    with pytest.warns(UserWarning, match=f"tensor {key} holds NaN or infinite values"):
        pk.PeftModel.from_pretrained(tiny_llama(), copy, strict=False)


def test_unknown_config_field_warns_and_loads_the_same_adapter(saved, copy, method):
    want = logits(pk.PeftModel.from_pretrained(tiny_llama(), saved[method]), model_inputs())
    edit_config(lambda d: d.update(field_from_a_newer_version={"x": 1}))(copy)
    with pytest.warns(UserWarning, match="field_from_a_newer_version"):
        model = pk.PeftModel.from_pretrained(tiny_llama(), copy)
    torch.testing.assert_close(logits(model, model_inputs()), want, atol=0, rtol=0)


def test_safe_bin_file_loads_like_the_safetensors_one(saved, copy, method):
    want = logits(pk.PeftModel.from_pretrained(tiny_llama(), saved[method]), model_inputs())
    _to_bin(lambda p, s: torch.save(s, p))(copy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = pk.PeftModel.from_pretrained(tiny_llama(), copy)
    torch.testing.assert_close(logits(model, model_inputs()), want, atol=0, rtol=0)


def test_every_registered_method_saves_finite_float_tensors(saved):
    """The NaN/dtype checks must never refuse a healthy file (diff pruning's compact form aside,
    which is checked by its own layer)."""
    for name, folder in saved.items():
        for key, tensor in load_file(str(folder / WEIGHTS)).items():
            assert tensor.is_floating_point() and torch.isfinite(tensor).all(), (name, key)


# -- a composing method (AdapterFusion over two bottleneck adapters) -------------------------------
@pytest.mark.parametrize("damage", sorted(WEIGHT_DAMAGE))
def test_damaged_fusion_leaves_its_loaded_members_as_they_were(tmp_path, damage):
    from methods.adapter.test_fusion import bert_members
    from tiny_models import tiny_bert

    bert_members().save_pretrained(tmp_path)  # members in a/ and b/, the fusion in f/
    change, pattern = WEIGHT_DAMAGE[damage]
    change(tmp_path / "f")
    model = pk.PeftModel.from_pretrained(tiny_bert(), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", "b")
    before = snapshot(model)
    with pytest.raises(ValueError, match=expected(pattern, tmp_path / "f")):
        model.load_adapter(tmp_path / "f", "f")
    assert sorted(model.peft_config) == ["a", "b"]
    assert_unchanged(model, before)
