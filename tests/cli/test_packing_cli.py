"""``peftkit train --packing``: packed causal-LM training rows, unpacked held-out data, refusals."""

from __future__ import annotations

import json

import pytest
import yaml

from peftkit.cli.main import main

from .conftest import qa_records, tiny_cls_args, write_jsonl


def lm_args(model_dir, data, out, *extra) -> list[str]:
    return ["train", "--task", "causal-lm", "--model", str(model_dir), "--data", str(data),
            "--question-column", "prompt", "--answer-column", "response", "--output-dir", str(out),
            "--target-modules", "q_proj", "v_proj", "--max-steps", "3", "--eval-steps", "3", "--batch-size", "2",
            "--max-length", "96", "--num-samples", "1", "--max-new-tokens", "3", "--learning-rate", "1e-2",
            "--no-progress-bar", "--no-tensorboard", *extra]


def test_packed_run_trains_on_rows_and_evaluates_unpacked(tmp_path, tiny_llama_dir, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(40))
    out = tmp_path / "run"
    assert main(lm_args(tiny_llama_dir, data, out, "--packing")) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["packed_examples"] == 36  # 40 minus the 10% held out
    assert summary["train_examples"] < summary["packed_examples"]  # a row of 96 tokens holds several pairs
    assert f"36 training examples packed into {summary['train_examples']} rows" in printed
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["packing"] is True
    assert main(["eval", str(out)]) == 0  # the held-out set is rebuilt unpacked, as training evaluated it
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(summary["after"], abs=1e-5)


def test_held_out_metrics_before_training_do_not_depend_on_packing(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(40))
    befores = []
    for packing in ("--packing", "--no-packing"):
        out = tmp_path / packing
        assert main(lm_args(tiny_llama_dir, data, out, packing, "--max-steps", "1")) == 0
        befores.append(json.loads((out / "summary.json").read_text())["before_metrics"])
    assert befores[0] == befores[1]


def test_packing_is_refused_for_classification(tmp_path, tiny_bert_dir, reviews_jsonl, capsys):
    out = tmp_path / "run"
    assert main(tiny_cls_args(tiny_bert_dir, reviews_jsonl, out, "--packing")) == 2
    err = capsys.readouterr().err
    assert "--packing" in err and "'classification'" in err and "--task causal-lm" in err
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:position_ids are ignored with prompt tuning")
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_packing_is_refused_for_methods_that_attend_across_rows(method, tmp_path, tiny_llama_dir, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(40))
    out = tmp_path / "run"
    argv = lm_args(tiny_llama_dir, data, out, "--packing", "--method", method, "--num-virtual-tokens", "4")
    argv.remove("--target-modules"), argv.remove("q_proj"), argv.remove("v_proj")
    assert main(argv) == 2
    assert "does not keep packed sequences apart" in capsys.readouterr().err
    assert not out.exists()  # refused before the run folder is made
