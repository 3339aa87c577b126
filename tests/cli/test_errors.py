"""Bad input ends with one line `error: ...`, exit code 2, and no run folder left behind."""

import json

import pytest

from peftkit.cli.main import main

from .conftest import tiny_cls_args, write_jsonl


def fails(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert match in err, err
    return err


@pytest.fixture
def out(tmp_path):
    return tmp_path / "run"


def test_missing_data_file(capsys, tiny_bert_dir, tmp_path, out):
    fails(capsys, tiny_cls_args(tiny_bert_dir, tmp_path / "nope.jsonl", out), "does not exist")
    assert not out.exists()


def test_unknown_column_suggests_the_nearest(capsys, tiny_bert_dir, reviews_jsonl, out):
    argv = tiny_cls_args(tiny_bert_dir, reviews_jsonl, out) + ["--text-column", "reveiw"]
    fails(capsys, argv, "did you mean 'review'")
    assert not out.exists()


def test_empty_dataset(capsys, tiny_bert_dir, tmp_path, out):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    fails(capsys, tiny_cls_args(tiny_bert_dir, empty, out), "no records")
    assert not out.exists()


def test_labels_that_do_not_match_the_head(capsys, tiny_bert_head_dir, reviews_jsonl, out):
    fails(capsys, tiny_cls_args(tiny_bert_head_dir, reviews_jsonl, out), "classification head has 3 labels")
    assert not out.exists()


def test_single_class_data(capsys, tiny_bert_dir, tmp_path, out):
    data = write_jsonl(tmp_path / "one.jsonl", [{"review": f"text {i}", "sentiment": "pos"} for i in range(10)])
    fails(capsys, tiny_cls_args(tiny_bert_dir, data, out), "at least two classes")


@pytest.mark.parametrize("content", [None, "not a model"])
def test_a_folder_that_is_not_a_model(capsys, tmp_path, reviews_jsonl, out, content):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    if content:
        (folder / "weights.bin").write_text(content)
    fails(capsys, tiny_cls_args(folder, reviews_jsonl, out), "not a transformers model folder")
    assert not out.exists()


def test_a_model_folder_with_a_broken_config(capsys, tmp_path, reviews_jsonl, out):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{ nope")
    fails(capsys, tiny_cls_args(folder, reviews_jsonl, out), "cannot load")
    assert not out.exists()


def test_missing_model_folder(capsys, tmp_path, reviews_jsonl, out):
    fails(capsys, tiny_cls_args(tmp_path / "absent", reviews_jsonl, out), "does not exist")


def test_unknown_yaml_key_suggests_the_nearest(capsys, tmp_path, out):
    config = tmp_path / "run.yaml"
    config.write_text("training:\n  learning_rat: 0.1\n")
    fails(capsys, ["train", "--config", str(config), "--output-dir", str(out)], "did you mean 'learning_rate'")
    config.write_text("lora:\n  lora_alpah: 4\n")
    fails(capsys, ["train", "--config", str(config)], "did you mean 'lora_alpha'")
    config.write_text("metod: lora\n")
    fails(capsys, ["train", "--config", str(config)], "did you mean 'method'")
    assert not out.exists()


def test_unknown_flag_and_method_suggest_the_nearest(capsys):
    fails(capsys, ["train", "--lora-alph", "4"], "did you mean '--lora-alpha'")
    fails(capsys, ["train", "--method", "lorra"], "did you mean 'lora'")
    fails(capsys, ["trian"], "did you mean 'train'")


def test_invalid_values_name_the_field(capsys):
    fails(capsys, ["train", "--r", "0"], "r=0")
    fails(capsys, ["train", "--learning-rate", "-1"], "learning_rate")
    fails(capsys, ["train", "--precision", "fp8"], "invalid choice")


def test_missing_config_file(capsys, tmp_path):
    fails(capsys, ["train", "--config", str(tmp_path / "absent.yaml")], "does not exist")


def test_existing_output_folder_is_not_overwritten(capsys, tiny_bert_dir, reviews_jsonl, out):
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fails(capsys, tiny_cls_args(tiny_bert_dir, reviews_jsonl, out), "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_other_commands_report_bad_paths(capsys, tmp_path):
    fails(capsys, ["inspect", str(tmp_path / "absent")], "not a folder")
    fails(capsys, ["eval", str(tmp_path)], "adapter_config.json")
    fails(capsys, ["merge", str(tmp_path), "-o", str(tmp_path / "m")], "adapter_config.json")
    fails(capsys, ["generate", str(tmp_path / "absent"), "--prompt", "hi"], "does not exist")
    assert not (tmp_path / "m").exists()


def test_resume_of_a_folder_that_is_not_a_run(capsys, tmp_path):
    fails(capsys, ["train", "--resume", str(tmp_path)], "not a run folder")


def test_resume_of_a_run_that_saved_no_checkpoint_says_how_to_start_it_again(capsys, tiny_bert_dir, reviews_jsonl, out):
    assert main(tiny_cls_args(tiny_bert_dir, reviews_jsonl, out, "--max-steps", "1")) == 0
    (out / "summary.json").unlink()  # as a run killed before its first checkpoint leaves it
    err = fails(capsys, ["train", "--resume", str(out)], f"{str(out)!r} holds no checkpoint to resume from")
    assert f"drop --resume and start it again: peftkit train --config {out / 'config.yaml'}" in err


def test_bad_json_lines_name_the_line(capsys, tiny_bert_dir, tmp_path, out):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"review": "ok", "sentiment": "pos"}) + "\n{broken\n")
    fails(capsys, tiny_cls_args(tiny_bert_dir, bad, out), "bad.jsonl:2")
