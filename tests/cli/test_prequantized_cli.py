"""`peftkit train --model FOLDER` where FOLDER is a 4-bit bitsandbytes checkpoint: QLoRA on it as stored."""
import json
import shutil

import pytest
import torch

from peftkit.cli.main import main
from peftkit.quant import QuantConfig, quantize_model, save_quantized_model

from .conftest import qa_records, write_jsonl


@pytest.fixture(scope="module")
def bnb_llama_dir(tmp_path_factory, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("bnb-llama")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    save_quantized_model(quantize_model(model, QuantConfig(bnb_4bit_use_double_quant=True)), folder)
    for name in tiny_llama_dir.iterdir():
        if name.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(name, folder / name.name)
    return folder


def argv(model_dir, data, out, *extra):
    return ["train", "--task", "causal-lm", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
            "--question-column", "prompt", "--answer-column", "response",
            "--target-modules", "q_proj", "v_proj", "--max-steps", "2", "--batch-size", "4", "--max-length", "48",
            "--num-samples", "0", "--no-progress-bar", "--no-tensorboard", *extra]


def test_train_and_eval_on_a_4bit_checkpoint(tmp_path, bnb_llama_dir, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(12))
    assert main(argv(bnb_llama_dir, data, tmp_path / "run", "--learning-rate", "1e-2")) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["after"] < summary["before"]
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(summary["after"], abs=1e-5)


def test_a_method_without_a_4bit_layer_is_refused(tmp_path, bnb_llama_dir, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(12))
    assert main(argv(bnb_llama_dir, data, tmp_path / "run", "--method", "ia3")) != 0
    assert "--model is a 4-bit checkpoint" in capsys.readouterr().err
