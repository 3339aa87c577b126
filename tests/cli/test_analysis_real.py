"""`peftkit sweep` and `compare` on the bundled MiniLM + review data: two short runs each (slow tier)."""
import csv

import pytest

from peftkit.cli.main import main

pytestmark = pytest.mark.slow

SHORT = ["--max-steps", "2", "--eval-steps", "2", "--max-train-samples", "16", "--max-eval-samples", "8", "--max-length", "32",
         "--batch-size", "8", "--no-progress-bar", "--no-tensorboard"]


def rows(folder) -> list[dict]:
    with open(folder / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_rank_sweep_on_the_bundled_job(tmp_path):
    assert main(["sweep", "--values", "2", "4", "--output-dir", str(tmp_path / "s"), *SHORT]) == 0
    found = rows(tmp_path / "s")
    assert [r["r"] for r in found] == ["2", "4"] and all(r["metric"] == "accuracy" for r in found)
    assert int(found[0]["trainable_params"]) < int(found[1]["trainable_params"])


def test_method_comparison_on_the_bundled_job(tmp_path):
    assert main(["compare", "--methods", "lora", "ia3", "--output-dir", str(tmp_path / "c"), *SHORT]) == 0
    found = rows(tmp_path / "c")
    assert [r["method"] for r in found] == ["lora", "ia3"] and {r["steps"] for r in found} == {"2"}
    assert (tmp_path / "c" / "results.png").is_file()
