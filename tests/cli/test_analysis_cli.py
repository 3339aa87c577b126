"""`peftkit params`, `memory` and `recommend` on tiny model folders and the bundled models (seconds each)."""
import json

import pytest

from peftkit import LoraConfig, get_peft_model
from peftkit.cli import common
from peftkit.cli.main import main
from peftkit.registry import list_methods


def run_json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_params_on_a_model_folder_equals_the_real_wrapped_model(capsys, tiny_bert_dir):
    info = run_json(capsys, "params", "--model", str(tiny_bert_dir), "--r", "4", "--target-modules", "query", "value")
    (counted,) = info["counts"]
    model = get_peft_model(common.load_classifier(tiny_bert_dir, {"neg": 0, "pos": 1}),
                           LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    assert (counted["trainable"], counted["total"]) == model.get_nb_trainable_parameters()
    assert info["task"] == "classification" and counted["method"] == "lora"


def test_params_of_lora_on_an_8b_llama_shape(capsys):
    info = run_json(capsys, "params", "--model", "llama-3-8b", "--r", "16", "--target-modules", "q_proj", "v_proj")
    (counted,) = info["counts"]
    assert counted["trainable"] == 32 * 16 * ((4096 + 4096) + (4096 + 1024))
    assert counted["percent_of_base"] == pytest.approx(100 * counted["trainable"] / counted["base"], abs=1e-6)


def test_params_bundled_default_and_all_methods(capsys):
    assert main(["params"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model: minilm (bert, classification)") and "lora by module: " in out
    info = run_json(capsys, "params", "--model", "smollm2", "--all-methods")
    assert [c["method"] for c in info["counts"]] == list_methods()
    # every method adds its trainable tensors to the frozen base (diff pruning's dense diff and gates
    # outnumber the base while training: it is parameter-efficient in storage, not in training)
    assert all(0 < c["trainable"] and c["total"] == c["base"] + c["trainable"] for c in info["counts"])


def test_params_config_json_file(capsys, tiny_llama_dir):
    info = run_json(capsys, "params", "--model", str(tiny_llama_dir / "config.json"), "--method", "ia3")
    assert info["task"] == "causal-lm" and info["counts"][0]["method"] == "ia3"


def test_memory_bundled_default_and_regimes(capsys):
    assert main(["memory"]) == 0
    assert "qlora" in capsys.readouterr().out
    info = run_json(capsys, "memory", "--model", "smollm2", "--batch-size", "2", "--seq-len", "128")
    full, lora, qlora = info["estimates"]
    assert [full["regime"], lora["regime"], qlora["regime"]] == ["full", "lora", "qlora"]
    assert full["total_bytes"] > lora["total_bytes"] > qlora["total_bytes"]
    assert qlora["weights_bytes"] < lora["weights_bytes"] and qlora["four_bit_base"]
    for e in info["estimates"]:
        parts = e["weights_bytes"] + e["gradients_bytes"] + e["optimizer_bytes"] + e["activations_bytes"]
        assert abs(parts - e["total_bytes"]) <= 4


def test_memory_options_change_what_they_should(capsys, tiny_llama_dir):
    base = ["memory", "--model", str(tiny_llama_dir), "--batch-size", "2", "--seq-len", "64"]
    plain = run_json(capsys, *base)["estimates"]
    ckpt = run_json(capsys, *base, "--gradient-checkpointing")["estimates"]
    adam8 = run_json(capsys, *base, "--optimizer", "adamw-8bit", "--no-double-quant")["estimates"]
    assert ckpt[0]["activations_bytes"] < plain[0]["activations_bytes"]
    assert ckpt[0]["weights_bytes"] == plain[0]["weights_bytes"]
    assert adam8[0]["optimizer_bytes"] < plain[0]["optimizer_bytes"]
    assert adam8[2]["weights_bytes"] > plain[2]["weights_bytes"]  # without double quantization


def test_recommend_small_gpu_for_an_8b_picks_a_4bit_base(capsys):
    info = run_json(capsys, "recommend", "--gpu-memory-gib", "16", "--model", "llama-3-8b", "--seq-len", "512",
                    "--batch-size", "1", "--methods", "lora", "ia3")
    first = info["ranking"][0]
    assert first["four_bit_base"] and first["fits"] and any("4-bit base" in r for r in first["reasons"])
    assert not next(c for c in info["ranking"] if c["name"] == "full")["fits"]


def test_recommend_bundled_default(capsys):
    assert main(["recommend", "--gpu-memory-gib", "8", "--need-merge"]) == 0
    out = capsys.readouterr().out
    assert " 1. " in out and "fits: needs about" in out


def test_recommend_exits_1_when_nothing_fits(capsys):
    assert main(["recommend", "--gpu-memory-gib", "0.5", "--model", "llama-3-8b", "--methods", "lora"]) == 1


@pytest.mark.parametrize("argv, message", [
    (["params", "--model", "llama-8b"], "llama-3-8b"),
    (["params", "--method", "lroa"], "did you mean 'lora'"),
    (["params", "--all-methods", "--r", "4"], "drop --method and the method options"),
    (["memory", "--batch-size", "0"], "batch_size must be a positive integer"),
    (["memory", "--optimizer", "sgd"], "invalid choice"),
    (["recommend"], "--gpu-memory-gib is required"),
    (["recommend", "--gpu-memory-gib", "8", "--methods", "nope"], "unknown method 'nope'"),
])
def test_bad_input_is_one_line_error(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_params_keeps_a_saved_head_s_classes(capsys, tiny_bert_head_dir):
    three = run_json(capsys, "params", "--model", str(tiny_bert_head_dir), "--r", "4")["counts"][0]
    five = run_json(capsys, "params", "--model", str(tiny_bert_head_dir), "--r", "4", "--num-labels", "5")["counts"][0]
    assert three["by_module"]["classifier"] == 3 * 32 + 3 and five["by_module"]["classifier"] == 5 * 32 + 5
