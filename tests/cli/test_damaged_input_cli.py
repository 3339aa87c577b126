"""Damaged adapter folders and bad YAML through the command line: `inspect` lists the problem
(exit 1), `eval` and `merge` end with one `error:` line (exit 2) and write nothing, and no input
ends in a traceback."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftkit import LoraConfig, get_peft_model
from peftkit.cli.main import main

from .test_errors import fails

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture
def adapter(tmp_path, tiny_llama_dir):
    """A LoRA adapter folder whose config names the tiny Llama folder as its base."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _nan(folder):
    state = load_file(str(folder / WEIGHTS))
    key = sorted(state)[0]
    state[key][0, 0] = float("nan")
    save_file(state, str(folder / WEIGHTS))
    return key


def _truncate(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 3])
    return "corrupt"


def _config(value):
    def damage(folder):
        (folder / CONFIG).write_text(value)
        return "must hold a JSON object" if value.startswith("[") else "target_modules=5 is invalid"
    return damage


def _targets_int(folder):
    data = json.loads((folder / CONFIG).read_text())
    data["target_modules"] = 5
    (folder / CONFIG).write_text(json.dumps(data))
    return "target_modules=5 is invalid"


class Code:
    def __reduce__(self):
        return (print, ("ran code from an adapter file",))


def _bin_with_code(folder):
    torch.save({**load_file(str(folder / WEIGHTS)), "x": Code()}, folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()
    return "pickled Python objects besides tensors (print)"


DAMAGE = {"truncated": _truncate, "nan": _nan, "config_list": _config("[1, 2]"), "targets_int": _targets_int,
          "bin_with_code": _bin_with_code}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_inspect_reports_the_damage_as_a_problem(capsys, adapter, damage):
    said = DAMAGE[damage](adapter)
    capsys.readouterr()  # drop what building the adapter printed
    assert main(["inspect", str(adapter)]) == 1
    out = capsys.readouterr()
    assert said in out.out and "Traceback" not in out.out + out.err
    assert "ran code" not in out.out


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_merge_and_eval_refuse_the_damage_in_one_line(capsys, adapter, damage, tmp_path, qa_jsonl):
    said = DAMAGE[damage](adapter)
    capsys.readouterr()
    fails(capsys, ["merge", str(adapter), "-o", str(tmp_path / "merged")], said)
    assert not (tmp_path / "merged").exists()
    fails(capsys, ["eval", str(adapter), "--data", str(qa_jsonl), "--question-column", "prompt",
                   "--answer-column", "response"], said)


def test_a_run_folder_with_a_corrupt_config_yaml(capsys, adapter, tmp_path):
    run = adapter.parent
    capsys.readouterr()
    (run / "config.yaml").write_text("task: [causal-lm\n")
    fails(capsys, ["eval", str(run)], "is not valid YAML")
    (run / "config.yaml").write_text("- a list\n")
    fails(capsys, ["merge", str(run), "-o", str(tmp_path / "m")], "must hold a mapping")


@pytest.mark.parametrize("yaml_text, said", [
    ("training:\n  learning_rate: fast\n", "learning_rate='fast' is invalid: expected float"),
    ("training:\n  max_steps: [3]\n", "max_steps=[3] is invalid: expected int or None"),
    ("data:\n  eval_fraction: half\n", "eval_fraction='half' is invalid"),
    ("lora:\n  target_modules: 5\n", "target_modules=5 is invalid"),
    ("task: 5\n", "task=5 is invalid: expected 'classification' or 'causal-lm'"),
    ("method: 5\n", "unknown method 5"),
])
def test_yaml_values_of_the_wrong_type_name_the_field(capsys, tmp_path, yaml_text, said):
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text)
    fails(capsys, ["train", "--config", str(config), "--output-dir", str(tmp_path / "run")], said)
    assert not (tmp_path / "run").exists()


def test_output_dir_that_is_a_file_is_refused_before_any_work(capsys, tmp_path, monkeypatch):
    from peftkit.cli import train

    monkeypatch.setattr(train, "prepare", lambda cfg: pytest.fail("the model was loaded before the check"))
    blocker = tmp_path / "taken"
    blocker.write_text("mine")
    fails(capsys, ["train", "--output-dir", str(blocker)], f"{str(blocker)!r} is a file")
    fails(capsys, ["train", "--output-dir", str(blocker / "run")], f"{str(blocker)!r} is a file")
    assert blocker.read_text() == "mine"
