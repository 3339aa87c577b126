"""`peftkit train/eval/generate/inspect` with prefix tuning, P-tuning v2 and P-tuning: flags come
from PrefixTuningConfig, PTuningV2Config and PromptEncoderConfig."""

import json

import pytest

from peftkit.cli.main import main


@pytest.mark.parametrize("method,flags,peft_type", [
    ("prefix", ["--prefix-projection", "--encoder-hidden-size", "16"], "PREFIX_TUNING"),
    ("ptuning_v2", [], "PREFIX_TUNING"),
    ("ptuning", ["--encoder-reparameterization-type", "LSTM"], "P_TUNING"),
])
def test_trains_evaluates_generates_and_inspects(method, flags, peft_type, tmp_path, tiny_llama_dir, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(f"line number {i} of a small text file" for i in range(30)))
    out = tmp_path / "run"
    argv = ["train", "--task", "causal-lm", "--method", method, "--model", str(tiny_llama_dir), "--data", str(text),
            "--output-dir", str(out), "--num-virtual-tokens", "5", *flags, "--max-steps", "3", "--batch-size", "4",
            "--max-length", "24", "--num-samples", "0", "--no-progress-bar", "--no-tensorboard"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config["num_virtual_tokens"] == 5
    assert config.get("prefix_projection", False) == (method == "prefix")
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert abs(json.loads(capsys.readouterr().out)["loss"] - summary["after"]) < 1e-5
    assert main(["generate", str(out), "--prompt", "line number", "--max-new-tokens", "3"]) == 0
    assert main(["inspect", str(out / "adapter")]) == 0
    report = capsys.readouterr().out
    assert peft_type in report and "problems:    none" in report
