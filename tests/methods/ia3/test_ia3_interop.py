"""(IA)^3 interop with Hugging Face PEFT (a test-only dependency), both directions.

An adapter trained a few steps (so every l has moved off 1) and saved by one library loads in the
other with the same outputs; identical configs give the same trainable counts, saved keys and
shapes, and config fields; HF's per-architecture defaults load; ``merge_and_unload`` agrees.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import peftkit as pk
from methods.ia3.case import ia3_targets
from methods.ia3.test_ia3_math import FEEDFORWARD, NAMES, Net
from hf_interop import assert_same_outputs_and_adapter_matters, load, saved
from tiny_models import FAMILIES, logits, model_inputs

hf = pytest.importorskip("peft")

ATOL = 1e-6
LIBS = {"hf": hf, "pk": pk}
DIRECTIONS = [("hf", "pk"), ("pk", "hf")]


def config_kwargs(family: str) -> dict:
    _, lora_targets, task = FAMILIES[family]
    targets, feedforward = ia3_targets(lora_targets)
    return dict(target_modules=targets, feedforward_modules=feedforward, task_type=task,
                fan_in_fan_out=family == "gpt2")


def make(lib: str, family: str, **overrides):
    kwargs = config_kwargs(family) | overrides
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LIBS[lib].get_peft_model(FAMILIES[family][0](), LIBS[lib].IA3Config(**kwargs))


def train(model, steps: int = 3) -> None:
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(steps):
        model(**model_inputs(seed=10 + step)).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    vectors = [p for n, p in model.named_parameters() if "ia3_l" in n]
    assert vectors and all((p - 1).abs().max() > 1e-4 for p in vectors), "training left some l at 1"


def comparable(config: dict, model) -> dict:
    """Sort lists; keep only modules_to_save entries naming a module (HF lists "score" for BERT too)."""
    names = {k.split(".")[-1] for k, _ in model.get_base_model().named_modules()}
    out = {k: sorted(v) if isinstance(v, list) else v for k, v in config.items()}
    if out.get("modules_to_save"):
        out["modules_to_save"] = [n for n in out["modules_to_save"] if n in names] or None
    return out


@pytest.mark.parametrize("src,dst", DIRECTIONS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_trained_adapter_loads_with_identical_outputs(family, src, dst, tmp_path):
    model = make(src, family)
    train(model)
    model.save_pretrained(tmp_path)
    loaded = load(dst, family, tmp_path)
    assert_same_outputs_and_adapter_matters(model, loaded, model_inputs(), ATOL)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_made_with_hf_defaults_loads(family, tmp_path):
    """HF fills target and feed-forward modules from its tables; the file carries them, so it loads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf.get_peft_model(FAMILIES[family][0](), hf.IA3Config(task_type=FAMILIES[family][2]))
    train(model)
    model.save_pretrained(tmp_path)
    hf_config = saved(tmp_path)[1]
    ours = config_kwargs(family)
    assert sorted(hf_config["target_modules"]) == sorted(ours["target_modules"])  # the case picks HF's defaults
    assert sorted(hf_config["feedforward_modules"]) == sorted(ours["feedforward_modules"])
    loaded = load("pk", family, tmp_path)
    inputs = model_inputs()
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_trainable_counts_keys_shapes_and_config(family, tmp_path):
    built = {lib: make(lib, family) for lib in LIBS}
    counts = {lib: m.get_nb_trainable_parameters() for lib, m in built.items()}
    assert counts["pk"] == counts["hf"]
    files = {}
    for lib, model in built.items():
        model.save_pretrained(tmp_path / lib)
        files[lib] = saved(tmp_path / lib)
    assert files["pk"][0] == files["hf"][0]
    assert any(k.endswith(".ia3_l") for k in files["pk"][0])
    ours, theirs = (comparable(files[lib][1], built[lib]) for lib in ("pk", "hf"))
    shared = sorted(ours.keys() & theirs.keys())
    assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}
    assert set(ours) - set(theirs) == set(), "we write a field HF's IA3Config does not know"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_and_unload_agrees(family, tmp_path):
    model = make("hf", family, init_ia3_weights=False)
    model.save_pretrained(tmp_path)
    merged = {lib: load(lib, family, tmp_path).merge_and_unload() for lib in LIBS}
    want, got = merged["hf"].state_dict(), merged["pk"].state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0, msg=key)
    inputs = model_inputs()
    torch.testing.assert_close(logits(merged["pk"], inputs), logits(model, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("src,dst", DIRECTIONS)
def test_linear_conv1d_and_grouped_conv_agree(src, dst, tmp_path):
    """Every layer type, including input scaling of a grouped Conv2d, against HF's own layers."""
    kwargs = dict(target_modules=list(NAMES), feedforward_modules=FEEDFORWARD, init_ia3_weights=False)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LIBS[src].get_peft_model(Net(), LIBS[src].IA3Config(**kwargs))
        model.save_pretrained(tmp_path)
        torch.manual_seed(0)
        loaded = LIBS[dst].PeftModel.from_pretrained(Net(), str(tmp_path))
    x = torch.randn(2, 7, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=ATOL, rtol=0)
        merged = {"src": model.merge_and_unload().state_dict(), "dst": loaded.merge_and_unload().state_dict()}
    for key in merged["src"]:
        torch.testing.assert_close(merged["dst"][key], merged["src"][key], atol=ATOL, rtol=0, msg=key)
