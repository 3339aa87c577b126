"""AdaLoRA interop with Hugging Face PEFT (a test-only dependency), both directions.

Adapters trained a few steps (so E has moved off 0), and adapters pruned by each library's rank
allocator (so the file holds fewer triplets and a ``rank_pattern``), load in the other library with
the same outputs; identical configs give the same trainable counts, saved keys, shapes and config
fields; ``merge_and_unload`` agrees.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import peftkit as pk
from peftkit.cli.inspect import inspect
from hf_interop import assert_same_outputs_and_adapter_matters, load, saved
from tiny_models import FAMILIES, logits, model_inputs

hf = pytest.importorskip("peft")

ATOL = 1e-6
LIBS = {"hf": hf, "pk": pk}
DIRECTIONS = [("hf", "pk"), ("pk", "hf")]
STEPS = 6


def make(lib: str, family: str, **overrides):
    _, targets, task = FAMILIES[family]
    kwargs = dict(target_modules=targets, task_type=task, init_r=4, target_r=2, total_step=STEPS, lora_alpha=8,
                  fan_in_fan_out=family == "gpt2") | overrides
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LIBS[lib].get_peft_model(FAMILIES[family][0](), LIBS[lib].AdaLoraConfig(**kwargs))


def allocate(lib: str, model, step: int) -> None:
    """Each library's own way to run the rank allocator after an optimizer step."""
    if lib == "hf":
        model.base_model.update_and_allocate(step)
    else:
        model.after_optimizer_step(step)


def train(lib: str, model, steps: int, allocator: bool) -> None:
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(1, steps + 1):
        model(**model_inputs(seed=10 + step)).logits.float().pow(2).mean().backward()
        opt.step()
        if allocator:
            allocate(lib, model, step)
        opt.zero_grad()
    model.eval()
    values = [p for n, p in model.named_parameters() if "lora_E" in n]
    assert values and any(p.numel() and p.abs().max() > 1e-4 for p in values), "training left E at 0"


@pytest.mark.parametrize("src,dst", DIRECTIONS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_trained_adapter_loads_with_identical_outputs(family, src, dst, tmp_path):
    model = make(src, family)
    train(src, model, 3, allocator=False)
    model.save_pretrained(tmp_path)
    loaded = load(dst, family, tmp_path)
    assert_same_outputs_and_adapter_matters(model, loaded, model_inputs(), ATOL)


@pytest.mark.parametrize("src,dst", DIRECTIONS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pruned_adapter_loads_with_its_ranks_and_outputs(family, src, dst, tmp_path):
    model = make(src, family)
    train(src, model, STEPS, allocator=True)
    model.save_pretrained(tmp_path)
    keys, config = saved(tmp_path)
    pattern = config["rank_pattern"]
    n_layers = len(pattern)
    assert n_layers and sum(sum(kept) for kept in pattern.values()) == 2 * n_layers  # target_r each
    for name, kept in pattern.items():
        assert keys[f"base_model.model.{name}"] == (sum(kept), 1)
    assert inspect(tmp_path).problems == []  # `peftkit inspect` reads the pruned ranks as expected
    loaded = load(dst, family, tmp_path)
    inputs = model_inputs()
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_trainable_counts_keys_shapes_and_config(family, tmp_path):
    built = {lib: make(lib, family) for lib in LIBS}
    counts = {lib: m.get_nb_trainable_parameters() for lib, m in built.items()}
    assert counts["pk"][0] == counts["hf"][0]
    # HF also counts its frozen one-entry ``ranknum`` parameter per layer; ours is a plain number.
    n_layers = sum(n.endswith("lora_E.default") for n, _ in built["hf"].named_parameters())
    assert counts["hf"][1] - counts["pk"][1] == n_layers
    files = {}
    for lib, model in built.items():
        model.save_pretrained(tmp_path / lib)
        files[lib] = saved(tmp_path / lib)
    assert files["pk"][0] == files["hf"][0]
    assert any(k.endswith(".lora_E") for k in files["pk"][0])
    for lib in LIBS:  # HF's file says r=8 beside init_r=4: not a problem (nor HF's extra "score" head)
        assert [p for p in inspect(tmp_path / lib).problems if "'score'" not in p] == []
    ours, theirs = ({k: sorted(v) if isinstance(v, list) else v for k, v in files[lib][1].items()} for lib in ("pk", "hf"))
    ours.pop("modules_to_save", None), theirs.pop("modules_to_save", None)  # HF lists "score" for BERT too
    shared = sorted(ours.keys() & theirs.keys())
    assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}
    assert set(ours) - set(theirs) == set(), "we write a field HF's AdaLoraConfig does not know"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_and_unload_agrees(family, tmp_path):
    model = make("hf", family, init_lora_weights=False)
    model.save_pretrained(tmp_path)
    merged = {lib: load(lib, family, tmp_path).merge_and_unload() for lib in LIBS}
    want, got = merged["hf"].state_dict(), merged["pk"].state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5, msg=key)
    inputs = model_inputs()
    torch.testing.assert_close(logits(merged["pk"], inputs), logits(model, inputs), atol=1e-4, rtol=1e-4)


def test_orth_penalty_matches_hf():
    """HF adds the penalty to the model's loss inside forward; ours is the explicit adapter_loss()."""
    models = {lib: make(lib, "llama", init_lora_weights=False) for lib in LIBS}
    models["pk"].load_state_dict(models["hf"].state_dict(), strict=False)
    inputs = model_inputs() | {"labels": model_inputs()["input_ids"]}
    with torch.no_grad():
        hf_loss = models["hf"](**inputs).loss
        plain = models["pk"](**inputs).loss
    torch.testing.assert_close(plain + models["pk"].adapter_loss(), hf_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_pruned_adapter_trained_on_writes_a_pattern_over_init_r_that_hf_loads(family, tmp_path):
    """Pruned to target_r=2, reloaded for training with target_r=1 and pruned again: the pattern keeps
    one entry per initial triplet (HF PEFT indexes its init_r rows with it), the file the kept rows."""
    model = make("pk", family)
    train("pk", model, STEPS, allocator=True)
    model.save_pretrained(tmp_path / "first")
    config = pk.PeftConfig.from_pretrained(tmp_path / "first")
    first = dict(config.rank_pattern)
    config.target_r = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        more = pk.PeftModel.from_pretrained(FAMILIES[family][0](), tmp_path / "first", is_trainable=True, config=config)
    train("pk", more, STEPS, allocator=True)
    more.save_pretrained(tmp_path / "second")
    keys, saved_config = saved(tmp_path / "second")
    pattern = saved_config["rank_pattern"]
    assert pattern.keys() == first.keys() and sum(sum(kept) for kept in pattern.values()) == len(pattern)
    for name, kept in pattern.items():  # init_r entries; only triplets the first pruning kept
        assert len(kept) == 4 and all(first[name][i] for i, k in enumerate(kept) if k)
        assert keys[f"base_model.model.{name}"] == (sum(kept), 1)
    assert inspect(tmp_path / "second").problems == []
    for lib in LIBS:
        loaded = load(lib, family, tmp_path / "second")
        torch.testing.assert_close(logits(loaded, model_inputs()), logits(more, model_inputs()), atol=ATOL, rtol=0)
