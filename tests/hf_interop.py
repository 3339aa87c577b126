"""What the HF-interop tests of every method share: load a saved adapter with either library, read
a saved folder, and check that an adapter reloaded in the other library gives the same outputs.

Libraries are named as in the tests: "hf" (HF PEFT, a test-only dependency) and "pk" (peftkit).
A test module still calls ``pytest.importorskip("peft")`` so that it is skipped without HF PEFT.
"""
from __future__ import annotations

import importlib
import json
import warnings

import torch
from safetensors.torch import load_file

from tiny_models import FAMILIES, logits, model_inputs

LIBRARY_MODULES = {"hf": "peft", "pk": "peftkit"}


def load(lib: str, family: str, path, adapter_name: str = "default"):
    """The adapter saved in ``path`` on a fresh ``family`` base, loaded by library ``lib``."""
    library = importlib.import_module(LIBRARY_MODULES[lib])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return library.PeftModel.from_pretrained(FAMILIES[family][0](), str(path), adapter_name=adapter_name)


def saved(folder) -> tuple[dict, dict]:
    """(file key -> tensor shape, adapter_config.json) of a saved adapter folder."""
    keys = {k: tuple(v.shape) for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    return keys, json.loads((folder / "adapter_config.json").read_text())


def assert_same_outputs_and_adapter_matters(model, loaded, inputs: dict, atol: float) -> None:
    """``loaded`` (the other library's reload of ``model``) gives ``model``'s logits, and its adapter
    changes them (so the comparison is not between two base models)."""
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=atol, rtol=0)
    with loaded.disable_adapter():
        base = logits(loaded, inputs)
    assert (base - logits(loaded, inputs)).abs().max() > 1e-4, "the loaded adapter changes nothing"


def make(lib: str, family: str, config_name: str, **overrides):
    """A fresh ``family`` model with a new adapter of ``config_name`` (e.g. "PrefixTuningConfig"),
    built by library ``lib``; virtual-token methods default to 4 tokens."""
    library = importlib.import_module(LIBRARY_MODULES[lib])
    kwargs = dict(num_virtual_tokens=4, task_type=FAMILIES[family][2]) | overrides
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return library.get_peft_model(FAMILIES[family][0](), getattr(library, config_name)(**kwargs))


def train(model, steps: int = 3) -> None:
    """A few Adam steps on a squared-logit loss; every trainable tensor must move."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(steps):
        model(**model_inputs(seed=10 + step)).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def padded_inputs(family: str) -> dict:
    """The tiny inputs with left padding on row 0 (and token types 1 for BERT)."""
    x = model_inputs()
    x["attention_mask"][0, :2] = 0
    if family == "bert":
        x["token_type_ids"] = torch.ones_like(x["input_ids"])
    return x


def assert_same_layout_as_hf(built: dict, tmp_path, config_name: str) -> dict:
    """``built`` maps "pk" and "hf" to the same adapter made by each library: equal trainable counts,
    equal file keys and shapes, equal config fields (classifier head names aside), and no field HF's
    ``config_name`` does not know. Returns peftkit's file keys -> shapes for further checks."""
    trainable = {lib: sum(p.numel() for p in m.parameters() if p.requires_grad) for lib, m in built.items()}
    assert trainable["pk"] == trainable["hf"]
    files = {}
    for lib, model in built.items():
        model.save_pretrained(tmp_path / lib)
        files[lib] = saved(tmp_path / lib)
    assert files["pk"][0] == files["hf"][0]
    ours, theirs = files["pk"][1], files["hf"][1]
    for config in (ours, theirs):  # HF lists every usual head name; compare the ones that exist
        config["modules_to_save"] = sorted(set(config["modules_to_save"] or []) & {"classifier"}) or None
    shared = sorted(ours.keys() & theirs.keys())
    assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}
    assert set(ours) - set(theirs) == set(), f"we write a field HF's {config_name} does not know"
    return files["pk"][0]
