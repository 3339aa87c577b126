"""UniPELT on the real SmolLM2-135M and the bundled Q/A pairs, through `peftkit train` (marked slow;
the MiniLM classification row does not suit its prefix part, see methods/mam/test_mam_real.py)."""
import pytest

from methods.mam.test_mam_real import train_and_reload

pytestmark = pytest.mark.slow


def test_unipelt_lowers_smollm2_held_out_loss_and_its_file_reproduces_it(tmp_path):
    summary, config, metrics = train_and_reload(tmp_path / "run", "unipelt")
    assert summary["before"] < 3.6 and summary["after"] < summary["before"] - 0.1, summary
    d, kv, L = 576, 192, 30  # SmolLM2: hidden 576, 3 KV heads x 64, 30 layers
    lora = 8 * (d + d) + 8 * (d + kv) + 2 * (d + 1)  # q and v, r = 8, each with its gate
    prefix = 8 * 2 * kv + (d + 1)  # per layer: 8 keys and values of 3 KV heads x 64, and a gate
    adapter = 2 * d * (d // 16) + d // 16 + d + (d + 1)  # after down_proj, m = 36, with its gate
    assert summary["trainable_params"] == L * (lora + prefix + adapter)
    assert config["peft_type"] == "UNIPELT" and config["gates"] is True
    assert metrics["loss"] == pytest.approx(summary["after"], abs=1e-5)
