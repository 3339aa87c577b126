"""`peftkit train/eval/generate/inspect` with prompt tuning: flags come from PromptTuningConfig."""

import json

from peftkit.cli.main import main


def test_prompt_tuning_trains_evaluates_generates_and_inspects(tmp_path, tiny_llama_dir, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(f"line number {i} of a small text file" for i in range(30)))
    out = tmp_path / "run"
    argv = ["train", "--task", "causal-lm", "--method", "prompt", "--model", str(tiny_llama_dir), "--data", str(text),
            "--output-dir", str(out), "--num-virtual-tokens", "5", "--prompt-tuning-init", "TEXT",
            "--prompt-tuning-init-text", "a small text", "--tokenizer-name-or-path", str(tiny_llama_dir),
            "--max-steps", "3", "--batch-size", "4", "--max-length", "24", "--num-samples", "0",
            "--no-progress-bar", "--no-tensorboard"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 5
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert abs(json.loads(capsys.readouterr().out)["loss"] - summary["after"]) < 1e-5
    assert main(["generate", str(out), "--prompt", "line number", "--max-new-tokens", "3"]) == 0
    assert main(["inspect", str(out / "adapter")]) == 0
    report = capsys.readouterr().out
    assert "PROMPT_TUNING" in report and "problems:    none" in report and "160 adapter" in report
