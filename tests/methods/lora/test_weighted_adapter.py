"""add_weighted_adapter: every combination type against HF PEFT on the same adapters, the merge
arithmetic against direct formulas, save/load both ways, and the refusals."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import peftkit
from peftkit.methods.lora import merge_utils
from peftkit.methods.lora.weighted import COMBINATION_TYPES, FACTORWISE
from tiny_models import logits, model_inputs, tiny_gpt2, tiny_llama

hf_peft = pytest.importorskip("peft")

DETERMINISTIC = [k for k in COMBINATION_TYPES if not k.startswith("dare")]
DARE = [k for k in COMBINATION_TYPES if k.startswith("dare")]
WEIGHTS = [0.7, -0.4]


def lora_folders(tmp_path, builder, targets, ranks=(4, 4)):
    """Two LoRA adapters (ranks ``ranks``) as if trained from the default initialisation (random B
    drawn after it; the config says init_lora_weights=True as usual), saved by peftkit; their folders."""
    folders = []
    for i, r in enumerate(ranks):
        torch.manual_seed(100 + i)
        config = peftkit.LoraConfig(r=r, lora_alpha=2 * r + i, target_modules=targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peftkit.get_peft_model(builder(), config)
        for _, layer in model.base_model.adapter_layers():
            for tensor in layer.adapter_tensors("default").values():
                torch.nn.init.normal_(tensor, std=0.2)
        model.save_pretrained(tmp_path / f"a{i}")
        folders.append(tmp_path / f"a{i}")
    return folders


def load_both(lib, builder, folders):
    """``builder()``'s model with the folders loaded as adapters "a0", "a1" by library ``lib``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.PeftModel.from_pretrained(builder(), str(folders[0]), adapter_name="a0")
        for i, folder in enumerate(folders[1:], start=1):
            model.load_adapter(str(folder), adapter_name=f"a{i}")
    return model


def lora_modules(model, name):
    """module name -> that module, for every module holding LoRA adapter ``name`` (either library)."""
    found = {}
    for key, module in model.named_modules():
        holder = getattr(module, "lora_A", None) or getattr(module, "lora_embedding_A", None)
        if holder is not None and name in holder:
            found[key] = module
    return found


def delta_weights(model, name):
    """module name -> its delta weight for adapter ``name`` (HF's get_delta_weight / our delta_weight)."""
    return {k: (m.get_delta_weight(name) if hasattr(m, "get_delta_weight") else m.delta_weight(name)).float()
            for k, m in lora_modules(model, name).items()}


def combine_both(tmp_path, builder, targets, kind, ranks=(4, 4), seed=None, **kwargs):
    """(peftkit model, HF model), each with adapter "mix" combined from "a0" and "a1"."""
    folders = lora_folders(tmp_path, builder, targets, ranks)
    models = []
    for lib in (peftkit, hf_peft):
        model = load_both(lib, builder, folders)
        if seed is not None:
            torch.manual_seed(seed)
        model.add_weighted_adapter(["a0", "a1"], WEIGHTS, "mix", combination_type=kind, **kwargs)
        models.append(model)
    return models


@pytest.mark.parametrize("kind", DETERMINISTIC)
def test_deterministic_kinds_equal_hf(tmp_path, kind):
    density = None if kind in ("linear", "cat", "svd") else 0.5
    ranks = (4, 4) if kind in FACTORWISE else (4, 3)  # cat and the svd kinds take any ranks
    ours, theirs = combine_both(tmp_path, tiny_llama, ["q_proj", "v_proj", "down_proj"], kind, ranks, density=density)
    mine, ref = delta_weights(ours, "mix"), delta_weights(theirs, "mix")
    assert mine.keys() == ref.keys() and len(mine) == 6
    for key in mine:
        torch.testing.assert_close(mine[key], ref[key], atol=1e-5, rtol=1e-4, msg=key)
    assert any(d.abs().max() > 1e-3 for d in mine.values())
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    torch.testing.assert_close(logits(ours, model_inputs()), logits(theirs, model_inputs()), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["svd", "cat", "ties_svd", "linear"])
def test_gpt2_conv1d_layout_equals_hf(tmp_path, kind):
    """GPT-2's Conv1D stores (in, out) weights: the SVD must run on the transposed delta, as in HF."""
    density = 0.6 if kind == "ties_svd" else None
    ours, theirs = combine_both(tmp_path, tiny_gpt2, ["c_attn", "c_proj"], kind, density=density)
    mine, ref = delta_weights(ours, "mix"), delta_weights(theirs, "mix")
    for key in mine:
        torch.testing.assert_close(mine[key], ref[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("kind", ["svd", "cat", "ties", "magnitude_prune_svd"])
def test_embedding_layers_equal_hf(tmp_path, kind):
    """Embedding factors are (r, vocab) and (dim, r), and the delta is (vocab, dim): transposed for the SVD."""
    density = None if kind in ("svd", "cat") else 0.5
    ours, theirs = combine_both(tmp_path, tiny_llama, ["embed_tokens", "q_proj"], kind, density=density)
    mine, ref = delta_weights(ours, "mix"), delta_weights(theirs, "mix")
    assert any("embed_tokens" in key for key in mine) and mine.keys() == ref.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], ref[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("kind", DARE)
def test_dare_kinds_equal_hf_under_the_same_seed(tmp_path, kind):
    """DARE draws torch.bernoulli masks in HF's order (layers, then A before B or adapter by adapter),
    after the same initialisation draws for the new adapter, so one seed before the call gives HF's
    adapter (for sources saved with the default init_lora_weights=True, whose mode HF reuses)."""
    ours, theirs = combine_both(tmp_path, tiny_llama, ["q_proj", "v_proj"], kind, seed=7, density=0.6)
    mine, ref = delta_weights(ours, "mix"), delta_weights(theirs, "mix")
    for key in mine:
        torch.testing.assert_close(mine[key], ref[key], atol=1e-5, rtol=1e-4, msg=key)


def test_cat_and_svd_are_exact_weighted_sums(tmp_path):
    """cat at any ranks, and svd at full rank, give exactly sum_i w_i dW_i (a direct computation)."""
    folders = lora_folders(tmp_path, tiny_llama, ["q_proj", "v_proj"], ranks=(4, 2))
    model = load_both(peftkit, tiny_llama, folders)
    model.add_weighted_adapter(["a0", "a1"], WEIGHTS, "cat", combination_type="cat")
    model.add_weighted_adapter(["a0", "a1"], WEIGHTS, "svd", combination_type="svd", svd_rank=6)
    assert model.peft_config["cat"].r == 6 and model.peft_config["cat"].lora_alpha == 6
    sources = [delta_weights(model, n) for n in ("a0", "a1")]
    for kind in ("cat", "svd"):
        for key, delta in delta_weights(model, kind).items():
            expected = WEIGHTS[0] * sources[0][key] + WEIGHTS[1] * sources[1][key]
            torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4)


def test_svd_clamp_and_rank(tmp_path):
    """svd_rank truncates to the best rank-k approximation; svd_clamp bounds every factor entry."""
    folders = lora_folders(tmp_path, tiny_llama, ["q_proj"])
    model = load_both(peftkit, tiny_llama, folders)
    model.add_weighted_adapter(["a0", "a1"], WEIGHTS, "r2", svd_rank=2)
    model.add_weighted_adapter(["a0", "a1"], WEIGHTS, "clamped", svd_rank=2, svd_clamp=0.9)
    sources = [delta_weights(model, n) for n in ("a0", "a1")]
    for key, delta in delta_weights(model, "r2").items():
        full = WEIGHTS[0] * sources[0][key] + WEIGHTS[1] * sources[1][key]
        u, s, vh = torch.linalg.svd(full)
        torch.testing.assert_close(delta, u[:, :2] @ torch.diag(s[:2]) @ vh[:2], atol=1e-5, rtol=1e-4)
        layer = model.get_submodule(key)
        a, b = layer.lora_A["clamped"].weight, layer.lora_B["clamped"].weight
        high = torch.quantile(torch.cat([layer.lora_B["r2"].weight.flatten(), layer.lora_A["r2"].weight.flatten()]), 0.9)
        assert max(a.abs().max(), b.abs().max()) <= high + 1e-6


def test_combined_adapter_saves_loads_and_hf_loads_it(tmp_path):
    folders = lora_folders(tmp_path, tiny_llama, ["q_proj", "v_proj"], ranks=(4, 2))
    model = load_both(peftkit, tiny_llama, folders)
    model.add_weighted_adapter(["a0", "a1"], WEIGHTS, "mix", combination_type="cat")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix." in n)
    model.set_adapter("mix")
    expected = logits(model, model_inputs())
    model.save_pretrained(tmp_path / "out", selected_adapters=["mix"])
    for lib in (peftkit, hf_peft):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = lib.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out" / "mix"))
        torch.testing.assert_close(logits(loaded, model_inputs()), expected, atol=1e-5, rtol=1e-4)


def test_modules_to_save_copy_comes_from_its_adapter(tmp_path):
    """The combined adapter starts from the trained head copy of the one adapter that has it."""
    torch.manual_seed(0)
    base = tiny_llama()
    config = peftkit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    model = peftkit.get_peft_model(base, config, adapter_name="a0")
    model.add_adapter("a1", peftkit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    head = model.base_model.model.lm_head
    with torch.no_grad():
        head.modules_to_save["a0"].weight.add_(1.0)
    model.add_weighted_adapter(["a0", "a1"], [1.0, 1.0], "mix", combination_type="cat")
    assert torch.equal(head.modules_to_save["mix"].weight, head.modules_to_save["a0"].weight)
    assert model.peft_config["mix"].modules_to_save == ["lm_head"]


# -- the arithmetic against direct formulas --------------------------------------------------
def test_ties_and_magnitude_prune_formulas():
    t = torch.tensor([[3.0, -1.0, 0.5, -4.0], [-2.0, 2.0, 0.1, -1.0]])
    w = torch.tensor([1.0, 0.5])
    pruned = torch.tensor([[3.0, 0.0, 0.0, -4.0], [-2.0, 2.0, 0.0, 0.0]])  # density 0.5: top 2 of 4 each
    torch.testing.assert_close(merge_utils.combine("magnitude_prune", list(t), w, 0.5), pruned[0] + 0.5 * pruned[1])
    # elected sign from the pruned sum (1, 2, 0, -4) -> (+, +, +, -); entries 0 disagree and are dropped
    expected = torch.tensor([3.0, 1.0, 0.0, -4.0])
    torch.testing.assert_close(merge_utils.combine("ties", list(t), w, 0.5), expected)
    # "frequency": signs (+,-), (-,+), (0,0) no, (-,0): votes 0, 0, 0, -1 -> (+, +, +, -)
    torch.testing.assert_close(merge_utils.combine("ties", list(t), w, 0.5, "frequency"), expected)


def test_dare_formulas_with_the_drawn_masks():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)]
    w = torch.tensor([0.8, -0.3])
    torch.manual_seed(3)
    linear = merge_utils.combine("dare_linear", t, w, 0.4)
    torch.manual_seed(3)
    masks = [torch.bernoulli(torch.full_like(x, 0.4)) for x in t]  # the same draws, in the same order
    kept = [x * m / 0.4 for x, m in zip(t, masks)]
    torch.testing.assert_close(linear, 0.8 * kept[0] - 0.3 * kept[1])
    torch.manual_seed(3)
    ties = merge_utils.combine("dare_ties", t, w, 0.4)
    sign = torch.where(kept[0] + kept[1] >= 0, 1.0, -1.0)
    agree = [(k.sign() == sign).float() for k in kept]
    expected = (0.8 * kept[0] * agree[0] - 0.3 * kept[1] * agree[1]) / (agree[0] + agree[1]).clamp(min=1)
    torch.testing.assert_close(ties, expected)


def test_linear_splits_the_weight_over_both_factors(tmp_path):
    """linear: A' = sum sign(w s) sqrt|w s| A_i, B' = sum sqrt|w s| B_i (direct computation)."""
    folders = lora_folders(tmp_path, tiny_llama, ["q_proj"])
    model = load_both(peftkit, tiny_llama, folders)
    model.add_weighted_adapter(["a0", "a1"], WEIGHTS, "mix", combination_type="linear")
    layer = next(iter(lora_modules(model, "mix").values()))
    scaled = [w * layer.scaling[n] for n, w in zip(("a0", "a1"), WEIGHTS)]
    a = sum(math.copysign(math.sqrt(abs(v)), v) * layer.lora_A[n].weight for n, v in zip(("a0", "a1"), scaled))
    b = sum(math.sqrt(abs(v)) * layer.lora_B[n].weight for n, v in zip(("a0", "a1"), scaled))
    torch.testing.assert_close(layer.lora_A["mix"].weight, a)
    torch.testing.assert_close(layer.lora_B["mix"].weight, b)
    assert layer.scaling["mix"] == 1.0


# -- refusals ----------------------------------------------------------------------------------
@pytest.fixture
def two_loras(tmp_path):
    return load_both(peftkit, tiny_llama, lora_folders(tmp_path, tiny_llama, ["q_proj"], ranks=(4, 2)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(combination_type="mean"), "combination_type='mean' is invalid"),
    (dict(combination_type="linear"), "same rank"),
    (dict(combination_type="ties"), "density=None is invalid"),
    (dict(combination_type="ties_svd", density=1.5), "density=1.5 is invalid"),
    (dict(majority_sign_method="vote"), "majority_sign_method='vote' is invalid"),
    (dict(svd_rank=0), "svd_rank=0 is invalid"),
])
def test_bad_options_are_refused_without_trace(two_loras, kwargs, message):
    before = {k: v.clone() for k, v in two_loras.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        two_loras.add_weighted_adapter(["a0", "a1"], WEIGHTS, "mix", **kwargs)
    assert "mix" not in two_loras.peft_config
    after = two_loras.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_bad_adapters_are_refused(two_loras):
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        two_loras.add_weighted_adapter(["a0", "nope"], WEIGHTS, "mix")
    with pytest.raises(ValueError, match="one number per adapter"):
        two_loras.add_weighted_adapter(["a0", "a1"], [1.0], "mix")
    two_loras.add_adapter("ia3", peftkit.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="combines LoRA adapters, but 'ia3' is a ia3 adapter"):
        two_loras.add_weighted_adapter(["a0", "ia3"], WEIGHTS, "mix")
    two_loras.add_adapter("rx", peftkit.LoraConfig(r=4, target_modules=".*v_proj"))
    with pytest.raises(ValueError, match="mix target_modules given as a regex string and as a list"):
        two_loras.add_weighted_adapter(["a0", "rx"], WEIGHTS, "mix")
    two_loras.add_adapter("l0", peftkit.LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0]))
    with pytest.raises(ValueError, match="do not match the adapted modules"):
        two_loras.add_weighted_adapter(["l0", "a0"], WEIGHTS, "mix", combination_type="cat")
    assert "mix" not in two_loras.peft_config
    with pytest.warns(UserWarning, match="already exists"):
        two_loras.add_weighted_adapter(["a0", "a1"], WEIGHTS, "a0")
