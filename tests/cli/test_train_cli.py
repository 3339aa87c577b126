"""`peftkit train` end to end on tiny models: the run folder, reproducing its numbers, other formats."""

import json

import pytest
import torch
import yaml

from peftkit import PeftModel
from peftkit.cli import common
from peftkit.cli.main import main
from peftkit.cli.runconfig import DataOptions
from peftkit.data.readers import load_records
from peftkit.train import Trainer, TrainingArguments
from peftkit.train.metrics import read_metrics

from .conftest import qa_records, review_records, tiny_cls_args

RUN_FILES = {"adapter", "config.yaml", "metrics.jsonl", "training_curves.png", "summary.json", "best"}


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, tiny_bert_dir, reviews_jsonl):
    out = tmp_path_factory.mktemp("runs") / "cls"
    assert main(tiny_cls_args(tiny_bert_dir, reviews_jsonl, out, "--learning-rate", "5e-3")) == 0
    return out


def test_run_folder_is_complete(cls_run):
    assert {p.name for p in cls_run.iterdir()} == RUN_FILES
    summary = json.loads((cls_run / "summary.json").read_text())
    for key in ("task", "method", "metric", "before", "after", "trainable_params", "total_params",
                "train_seconds", "peak_memory_bytes"):
        assert key in summary, key
    assert summary["task"] == "classification" and summary["method"] == "lora" and summary["metric"] == "accuracy"
    assert 0 < summary["trainable_params"] < summary["total_params"] and summary["peak_memory_bytes"] > 0
    assert summary["steps"] == 6 and summary["labels"] == ["neg", "pos"]
    records = read_metrics(cls_run / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval_accuracy" in r] == [0, 3, 6]  # 0: before training
    assert records[0]["eval_accuracy"] == summary["before"]


def test_saved_adapter_reproduces_the_reported_metric(cls_run, tiny_bert_dir):
    """Load adapter/ with PeftModel.from_pretrained on a fresh base and evaluate the same split."""
    summary = json.loads((cls_run / "summary.json").read_text())
    config = yaml.safe_load((cls_run / "config.yaml").read_text())
    tokenizer = common.load_tokenizer(tiny_bert_dir)
    label2id = {label: i for i, label in enumerate(summary["labels"])}
    data = common.build_data("classification", tokenizer, DataOptions(**config["data"]),
                             config["training"]["seed"], label2id)
    model = PeftModel.from_pretrained(common.load_classifier(tiny_bert_dir, label2id), str(cls_run / "adapter"))
    metrics = Trainer(model, TrainingArguments(task="classification", progress_bar=False, device="cpu"),
                      eval_dataset=data.eval, collate_fn=data.collate).evaluate()
    assert metrics["accuracy"] == summary["after"]
    assert metrics["loss"] == pytest.approx(summary["after_metrics"]["loss"], abs=1e-6)


def test_eval_command_reproduces_the_reported_metric(cls_run, capsys):
    summary = json.loads((cls_run / "summary.json").read_text())
    assert main(["eval", str(cls_run)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == summary["after"]


def test_config_yaml_reruns_the_same_training(cls_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(cls_run / "config.yaml")]) == 0
    (rerun,) = (tmp_path / "runs").iterdir()
    assert rerun.name.startswith("classification-lora-")
    losses = [[r.get("loss"), r.get("eval_loss")] for r in read_metrics(rerun / "metrics.jsonl")]
    assert losses == [[r.get("loss"), r.get("eval_loss")] for r in read_metrics(cls_run / "metrics.jsonl")]
    assert json.loads((rerun / "summary.json").read_text())["after"] == json.loads((cls_run / "summary.json").read_text())["after"]


def test_inspect_describes_the_adapter(cls_run, capsys):
    assert main(["inspect", str(cls_run / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    summary = json.loads((cls_run / "summary.json").read_text())
    assert info["method"] == "LORA" and info["r"] == 8 and info["observed_ranks"] == {"8": 4}
    assert info["target_modules"] == ["query", "value"] and info["adapted_modules"] == 4
    assert info["parameters"] == summary["trainable_params"] and info["modules_to_save"]["classifier"] == 66
    assert info["problems"] == []


def test_inspect_finds_problems(cls_run, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(cls_run / "adapter", broken)
    weights = load_file(broken / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("lora_A.weight"))
    weights[key][0, 0] = float("nan")
    save_file(weights, broken / "adapter_model.safetensors")
    config = json.loads((broken / "adapter_config.json").read_text())
    config.update(r=4, target_modules=["key"])
    (broken / "adapter_config.json").write_text(json.dumps(config))
    assert main(["inspect", str(broken)]) == 1
    text = capsys.readouterr().out
    assert "NaN" in text and "rank 8 but the config says r=4" in text and "do not fit target_modules" in text
    (broken / "adapter_config.json").unlink()
    assert main(["inspect", str(broken)]) == 1
    assert "adapter_config.json is missing" in capsys.readouterr().out


def test_merge_gives_a_plain_model_with_the_same_outputs(cls_run, tmp_path, tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    assert main(["merge", str(cls_run), "-o", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    label2id = {"neg": 0, "pos": 1}
    peft = PeftModel.from_pretrained(common.load_classifier(tiny_bert_dir, label2id), str(cls_run / "adapter")).eval()
    batch = common.load_tokenizer(tmp_path / "merged")(["a great film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, peft(**batch).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_other_formats_with_column_mapping(fmt, tmp_path, tiny_bert_dir):
    import pandas as pd

    path = tmp_path / f"reviews.{fmt}"
    frame = pd.DataFrame(review_records(48))
    frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path)
    out = tmp_path / "run"
    assert main(tiny_cls_args(tiny_bert_dir, path, out, "--max-steps", "2")) == 0
    assert json.loads((out / "summary.json").read_text())["train_examples"] == len(load_records(path)) - 4


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, tiny_llama_dir):
    folder = tmp_path_factory.mktemp("lm")
    data = folder / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_records()))
    out = folder / "run"
    argv = ["train", "--task", "causal-lm", "--model", str(tiny_llama_dir), "--data", str(data),
            "--question-column", "prompt", "--answer-column", "response", "--output-dir", str(out),
            "--target-modules", "q_proj", "v_proj", "--max-steps", "4", "--eval-steps", "2", "--batch-size", "4",
            "--max-length", "48", "--num-samples", "2", "--max-new-tokens", "5", "--learning-rate", "1e-2",
            "--no-progress-bar", "--no-tensorboard"]
    assert main(argv) == 0
    return out


def test_causal_lm_run_reports_loss_perplexity_and_samples(lm_run):
    summary = json.loads((lm_run / "summary.json").read_text())
    assert summary["metric"] == "loss" and summary["after"] < summary["before"]
    assert summary["after_metrics"]["perplexity"] == pytest.approx(torch.tensor(summary["after"]).exp().item(), rel=1e-5)
    assert len(summary["samples"]) == 2 and set(summary["samples"][0]) == {"question", "before", "after"}


def test_causal_lm_eval_and_generate_commands(lm_run, capsys):
    summary = json.loads((lm_run / "summary.json").read_text())
    assert main(["eval", str(lm_run)]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(summary["after"], abs=1e-5)
    question = summary["samples"][0]["question"]
    assert main(["generate", str(lm_run), "--prompt", question, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == summary["samples"][0]["after"]


def test_plain_text_file_trains_a_causal_lm(tmp_path, tiny_llama_dir):
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(f"line number {i} of a small text file" for i in range(30)))
    out = tmp_path / "run"
    argv = ["train", "--task", "causal-lm", "--model", str(tiny_llama_dir), "--data", str(text),
            "--output-dir", str(out), "--target-modules", "q_proj", "--max-steps", "2", "--batch-size", "4",
            "--max-length", "24", "--num-samples", "0", "--no-progress-bar", "--no-tensorboard"]
    assert main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["samples"] == []


def test_methods_lists_lora(capsys):
    assert main(["methods"]) == 0
    assert capsys.readouterr().out.split("\n")[0] == "lora"


def test_inspect_describes_a_scaling_method_without_ranks(tmp_path, capsys):
    from peftkit import IA3Config, get_peft_model
    from tiny_models import tiny_llama

    get_peft_model(tiny_llama(), IA3Config()).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "IA3" in out and "rank:" not in out and "problems:    none" in out
    assert "k_proj" in out and "6 adapted modules" in out


def test_cuda_graphs_on_a_cpu_run_is_refused_before_the_run_folder_exists(tmp_path, tiny_bert_dir, reviews_jsonl,
                                                                          capsys):
    out = tmp_path / "run"
    assert main(tiny_cls_args(tiny_bert_dir, reviews_jsonl, out, "--cuda-graphs", "--device", "cpu")) == 2
    assert "cuda_graphs=True needs a CUDA device" in capsys.readouterr().err
    assert not out.exists()


def test_pad_to_multiple_of_reaches_the_collator_and_cuda_graphs_defaults_it_to_64(tmp_path, tiny_bert_dir,
                                                                                   reviews_jsonl):
    tokenizer = common.load_tokenizer(tiny_bert_dir)
    opts = DataOptions(path=str(reviews_jsonl), text_column="review", label_column="sentiment", max_length=16)
    assert common.build_data("classification", tokenizer, opts, 0).collate.pad_to_multiple_of == 1
    assert common.build_data("classification", tokenizer, opts, 0, cuda_graphs=True).collate.pad_to_multiple_of == 64
    opts = DataOptions(path=str(reviews_jsonl), text_column="review", label_column="sentiment", max_length=16,
                      pad_to_multiple_of=8)
    data = common.build_data("classification", tokenizer, opts, 0, cuda_graphs=True)
    assert data.collate([data.train[0]])["input_ids"].shape[1] % 8 == 0
