"""PiSSA, OLoRA and LoftQ initialisations against direct computations, and their behaviour in the engine."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import AdaLoraConfig, DoraConfig, LoftQConfig, LoraConfig, PeftModel, get_peft_model
from peftkit.methods.lora import inits
from peftkit.quant import nf4, quantize_model

WEIGHT_INITS = ["pissa", "pissa_niter_4", "olora", "loftq"]


class Net(nn.Module):
    """A Linear and a GPT-2 Conv1D (weight stored (in, out)), with biases."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(24, 20)
        self.gpt = Conv1D(16, 20)  # in=20, out=16

    def forward(self, x):
        return self.gpt(torch.tanh(self.lin(x)))


def config(mode, r=4, **kw) -> LoraConfig:
    loftq = LoftQConfig(loftq_iter=kw.pop("loftq_iter", 1)) if mode == "loftq" else {}
    return LoraConfig(r=r, lora_alpha=kw.pop("lora_alpha", 8), target_modules=["lin", "gpt"], init_lora_weights=mode,
                      loftq_config=loftq, **kw)


def wrap(mode, seed=0, **kw):
    net = Net(seed)
    original = copy.deepcopy(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fan_in_fan_out correction for Conv1D
        return original, get_peft_model(net, config(mode, **kw))


def out_in(module) -> torch.Tensor:
    """A module's weight as (out, in) in float64."""
    w = module.weight.detach().double()
    return w.T if isinstance(module, Conv1D) else w


def factors(peft, key):
    layer = peft.base_model.model.get_submodule(key)
    return layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double(), layer


# -- the math against direct computations --------------------------------------------------------------
@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_is_the_principal_part_and_the_base_its_residual(use_rslora):
    original, peft = wrap("pissa", use_rslora=use_rslora)
    for key in ("lin", "gpt"):
        a, b, layer = factors(peft, key)
        w = out_in(original.get_submodule(key))
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        principal = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]  # best rank-4 approximation of W
        scale = layer.scaling["default"]
        assert scale == (8 / 2 if use_rslora else 2)
        torch.testing.assert_close(scale * b @ a, principal, atol=1e-5, rtol=0)
        residual = out_in(layer.base_layer)
        torch.testing.assert_close(residual, w - principal, atol=1e-5, rtol=0)
        torch.testing.assert_close(residual + scale * b @ a, w, atol=1e-6, rtol=0)
        # B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T up to the sign of each singular pair
        torch.testing.assert_close(b.norm(dim=0) ** 2, s[:4] / scale, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.norm(dim=1) ** 2, s[:4] / scale, atol=1e-5, rtol=1e-5)


def test_pissa_niter_approximates_the_principal_part_with_subspace_iterations():
    w = torch.randn(64, 48, dtype=torch.float64)
    w[:, :4] *= 10  # a clear top-4 subspace
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    exact = u[:, :4] * s[:4] @ vh[:4]
    errors = []
    for niter in (1, 4):
        torch.manual_seed(0)
        a, b = inits.pissa(w.float(), 4, 0.5, niter=niter)
        errors.append(((0.5 * b.double() @ a.double()) - exact).norm() / exact.norm())
    assert errors[1] < 1e-4 and errors[1] <= errors[0]


def test_olora_against_a_direct_qr():
    original, peft = wrap("olora")
    for key in ("lin", "gpt"):
        a, b, layer = factors(peft, key)
        w = out_in(original.get_submodule(key)).float()
        q, r = torch.linalg.qr(w)
        torch.testing.assert_close(b.float(), q[:, :4])
        torch.testing.assert_close(a.float(), r[:4])
        torch.testing.assert_close(b.T @ b, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
        scale = layer.scaling["default"]
        torch.testing.assert_close(out_in(layer.base_layer), w.double() - scale * b @ a, atol=1e-6, rtol=0)


def loftq_error(w: torch.Tensor, iters: int, scaling: float = 2.0) -> float:
    a, b, base_form = inits.loftq(w, 8, scaling, iters)
    return (w - inits.dequantized(base_form) - scaling * b @ a).norm().item()


def test_loftq_error_falls_with_iterations_and_beats_plain_nf4():
    torch.manual_seed(0)
    w = torch.randn(96, 64) * 0.05
    packed, state = nf4.quantize_4bit(w, "nf4", 64)
    plain = (w - nf4.dequantize_4bit(packed, state)).norm().item()
    errors = [loftq_error(w, t) for t in (1, 2, 5)]
    assert errors[0] < plain and errors[2] < errors[1] < errors[0], (plain, errors)
    # iteration 1 is the rank-8 SVD of the plain NF4 error, divided by the scaling
    a, b, base_form = inits.loftq(w, 8, 2.0, 1)
    err = w - nf4.dequantize_4bit(packed, state)
    u, s, vh = torch.linalg.svd(err.double(), full_matrices=False)
    torch.testing.assert_close(2.0 * b.double() @ a.double(), u[:, :8] * s[:8] @ vh[:8], atol=1e-5, rtol=0)
    assert torch.equal(inits.dequantized(base_form), nf4.dequantize_4bit(packed, state))


def test_loftq_base_is_its_nf4_codes_so_a_4bit_load_gives_the_same_model():
    original, peft = wrap("loftq", loftq_iter=2)
    x = torch.randn(3, 24)
    with torch.no_grad():
        adapted = peft(x)
        merged_base = copy.deepcopy(peft).unload()  # the rewritten base, adapters removed
        quantized = quantize_model(copy.deepcopy(merged_base))
        for key in ("lin", "gpt"):  # deq(Q) quantizes to Q again: the same weights, bit for bit
            rewritten = out_in(merged_base.get_submodule(key)).float()
            assert torch.equal(quantized.get_submodule(key).dequantize(torch.float32), rewritten)
        torch.testing.assert_close(quantized(x), merged_base(x), atol=1e-6, rtol=0)
        plain = quantize_model(copy.deepcopy(original))
        ref = original(x)
        assert (adapted - ref).norm() < 0.8 * (plain(x) - ref).norm()
    for key in ("lin", "gpt"):
        w = out_in(original.get_submodule(key)).float()
        a, b, layer = factors(peft, key)
        packed, state = nf4.quantize_4bit(w, "nf4", 64)
        lora_err = (w.double() - out_in(layer.base_layer) - layer.scaling["default"] * b @ a).norm()
        assert lora_err < (w - nf4.dequantize_4bit(packed, state)).norm()


# -- behaviour in the engine -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", WEIGHT_INITS)
def test_output_at_init_and_merge_equivalence(mode):
    original, peft = wrap(mode)
    x = torch.randn(5, 24)
    with torch.no_grad():
        ref, start = original(x), peft(x)
        if mode != "loftq":
            torch.testing.assert_close(start, ref, atol=1e-5, rtol=0)
        for p in peft.parameters():  # a trained adapter: move every factor
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        trained = peft(x)
        peft.merge_adapter()
        torch.testing.assert_close(peft(x), trained, atol=1e-5, rtol=0)
        peft.unmerge_adapter()
        torch.testing.assert_close(peft(x), trained, atol=1e-6, rtol=0)
        merged = peft.merge_and_unload()
        torch.testing.assert_close(merged(x), trained, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["pissa", "olora", "loftq"])
def test_saved_adapter_reloads_onto_the_original_base(mode, tmp_path):
    """The file keeps init_lora_weights, so loading onto the original base redoes the (deterministic)
    rewrite and then reads the trained factors: the trained model comes back (as in HF PEFT)."""
    original, peft = wrap(mode)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(4, 24)
    peft.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path)
    assert loaded.peft_config["default"].init_lora_weights == mode
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), peft(x), atol=1e-5, rtol=0)


def test_bf16_base_keeps_its_dtype_and_adapters_stay_fp32():
    net = Net().to(torch.bfloat16)
    original = copy.deepcopy(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(net, config("pissa"))
    layer = peft.base_model.model.lin
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(peft(x), original(x), atol=0.05, rtol=0.02)


# -- what is refused --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, text", [("xavier", "'pissa_niter_K'"), ("pissa_niter_0", "K >= 1"),
                                        ("pissa_niter_", "'olora'"), ("pissa_niter_x", "'loftq'"),
                                        ("PISSA", "'pissa'"), (3, "bool or str (True: ")])
def test_bad_init_strings_list_the_valid_ones(mode, text):
    with pytest.raises(ValueError, match="init_lora_weights=") as err:
        LoraConfig(init_lora_weights=mode)
    assert text in str(err.value)


def test_loftq_options_are_checked():
    with pytest.raises(ValueError, match="loftq_config"):
        LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq_bits=8 .*4"):
        LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=8))
    with pytest.raises(ValueError, match="loftq_iter=0"):
        LoftQConfig(loftq_iter=0)
    with pytest.raises(ValueError, match="loftq_config=.*LoftQConfig"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"bits": 4})
    assert LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4}).loftq_config == \
        {"loftq_bits": 4, "loftq_iter": 1}
    with pytest.warns(UserWarning, match="loftq_config.*ignored"):
        assert LoraConfig(loftq_config=LoftQConfig()).loftq_config == {}


def test_dora_and_adalora_refuse_weight_inits():
    with pytest.raises(ValueError, match="use_dora=True"):
        LoraConfig(init_lora_weights="pissa", use_dora=True)
    with pytest.raises(ValueError, match="use_dora=True"):
        DoraConfig(init_lora_weights="olora")
    with pytest.raises(ValueError, match="init_lora_weights='pissa'.*expected bool"):
        AdaLoraConfig(init_lora_weights="pissa", total_step=10)


class WithEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)
        self.emb = nn.Embedding(10, 8)


@pytest.mark.parametrize("mode", ["pissa", "loftq"])
def test_unsupported_target_fails_before_any_base_weight_changes(mode):
    net = WithEmbedding()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = LoraConfig(r=2, target_modules=["lin", "emb"], init_lora_weights=mode,
                     loftq_config=LoftQConfig() if mode == "loftq" else {})
    with pytest.raises(ValueError, match="'emb' is a Embedding.*exclude_modules"):
        get_peft_model(net, cfg)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert type(net.lin) is nn.Linear


def test_4bit_base_is_refused_with_the_way_to_do_it():
    net = quantize_model(nn.Sequential(nn.Linear(64, 64)))
    with pytest.raises(ValueError, match="4-bit.*full-precision model.*quantize_model"):
        get_peft_model(net, LoraConfig(r=2, target_modules=["0"], init_lora_weights="olora"))


def test_rank_above_the_weight_rank_is_refused():
    with pytest.raises(ValueError, match=r"r <= min\(out, in\).*'gpt'"):
        wrap("pissa", r=20, rank_pattern={"lin": 4})


def test_mixed_batch_beside_a_rewritten_base_is_refused():
    _, peft = wrap("pissa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.add_adapter("plain", LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    x = torch.randn(2, 24)
    with pytest.raises(ValueError, match="'default' was initialised with init_lora_weights='pissa'.*'__base__'"):
        peft(x, adapter_names=["default", "__base__"])
    with pytest.raises(ValueError, match="path_initial_model_for_weight_conversion"):
        peft(x, adapter_names=["plain", "plain"])
    with torch.no_grad():
        torch.testing.assert_close(peft(x, adapter_names=["default", "default"]), peft(x))


def test_a_second_adapter_beside_a_rewritten_base_warns():
    _, peft = wrap(True)
    with pytest.warns(UserWarning, match="rewrites the base weights, which adapters \\['default'\\] also see"):
        peft.add_adapter("pissa", config("pissa"))


def test_cli_takes_the_init_as_a_flag_and_names_the_valid_ones(tmp_path, capsys):
    from peftkit.cli.main import main

    argv = ["train", "--method", "lora", "--init-lora-weights", "pissa_niter_0", "--output-dir", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "init_lora_weights='pissa_niter_0'" in capsys.readouterr().err
    assert main(argv[:4] + ["loftq"] + argv[5:]) == 2
    assert "--loftq-config" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_meta_models_get_shapes_only_for_the_params_and_memory_tools():
    with torch.device("meta"):
        peft = get_peft_model(nn.Sequential(nn.Linear(64, 64)), LoraConfig(r=4, target_modules=["0"],
                                                                           init_lora_weights="pissa"))
    assert peft.get_nb_trainable_parameters() == (512, 4672)
    assert peft.base_model.model[0].base_rewritten == {}
