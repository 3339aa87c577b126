"""`peftkit sweep` and `peftkit compare` on a tiny BERT: one train job per entry, one table."""
import csv
import json

import pytest
import yaml

from peftkit.cli.main import main

from .conftest import tiny_cls_args


def shared(model_dir, data) -> list[str]:
    """tiny_cls_args without the train subcommand, its output folder and its method options."""
    argv = tiny_cls_args(model_dir, data, "unused")[1:]
    drop = argv.index("--output-dir")
    argv = argv[:drop] + argv[drop + 2:]
    start = argv.index("--target-modules")
    return argv[:start] + argv[start + 3:] + ["--max-steps", "3", "--eval-steps", "3"]


def table(folder) -> tuple[list[dict], dict]:
    with open(folder / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((folder / "results.json").read_text())


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_bert_dir, reviews_jsonl):
    out = tmp_path_factory.mktemp("sweep") / "r"
    assert main(["sweep", "--values", "2", "8", "--output-dir", str(out), *shared(tiny_bert_dir, reviews_jsonl),
                 "--target-modules", "query", "value"]) == 0
    return out


def test_sweep_writes_one_run_per_value_and_the_tables(swept):
    rows, doc = table(swept)
    assert [r["label"] for r in rows] == ["r=2", "r=8"] and [r["r"] for r in rows] == ["2", "8"]
    assert (swept / "results.png").is_file() and doc["swept"] == "r"
    for row, run in zip(rows, doc["runs"]):
        summary = json.loads((swept / row["run_dir"].split("/")[-1] / "summary.json").read_text())
        assert int(row["trainable_params"]) == summary["trainable_params"] == run["trainable_params"]
        assert float(row["after"]) == summary["after"] and int(row["steps"]) == summary["steps"] == 3
        assert float(row["train_seconds"]) > 0 and int(row["peak_memory_bytes"]) > 0
    configs = [yaml.safe_load((swept / f"0{i}-r={r}" / "config.yaml").read_text()) for i, r in enumerate((2, 8))]
    assert [c["lora"]["r"] for c in configs] == [2, 8]
    assert configs[0]["training"] == configs[1]["training"] and configs[0]["data"] == configs[1]["data"]
    # LoRA grows by r x (in + out) per adapted module: 2 layers x (query, value) of 32 -> 32
    assert int(rows[1]["trainable_params"]) - int(rows[0]["trainable_params"]) == (8 - 2) * 2 * 2 * (32 + 32)


def test_compare_runs_each_method_on_the_same_data_steps_and_seed(tmp_path, tiny_bert_dir, reviews_jsonl):
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "lora:r=4:target_modules=query,value", "ia3:target_modules=query,value",
                 "--output-dir", str(out), *shared(tiny_bert_dir, reviews_jsonl)]) == 0
    rows, doc = table(out)
    assert [r["method"] for r in rows] == ["lora", "ia3"] and rows[0]["r"] == "4"
    assert len({r["steps"] for r in rows}) == 1 and (out / "results.png").is_file()
    configs = [yaml.safe_load((out / name / "config.yaml").read_text())
               for name in ("00-lora_r=4_target_modules=query_value", "01-ia3_target_modules=query_value")]
    assert configs[0]["training"] == configs[1]["training"] and configs[0]["data"] == configs[1]["data"]
    assert configs[0]["lora"]["target_modules"] == ["query", "value"] == configs[1]["ia3"]["target_modules"]
    assert int(rows[0]["trainable_params"]) > int(rows[1]["trainable_params"])


@pytest.mark.parametrize("argv, message", [
    (["sweep", "--values", "2", "2"], "repeats a value"),
    (["sweep", "--r", "4"], "--r is the swept option"),
    (["sweep", "--param", "nope", "--values", "1"], "unrecognized arguments: --nope"),
    (["sweep", "--resume", "runs/x"], "drop --resume"),
    (["compare", "--methods", "lora", "ia3", "--r", "4"], "options of one method go after its name"),
    (["compare", "--methods", "lora:r"], "is not OPTION=VALUE"),
    (["compare", "--method", "lora"], "drop --method"),
])
def test_bad_input_fails_before_any_run(capsys, tmp_path, argv, message):
    assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
