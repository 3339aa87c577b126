"""`peftkit` with the bottleneck adapter: listed, its options are flags, placement picks the targets,
a run trains and reloads, and merging is refused with a message instead of dropping the adapter."""

import dataclasses
import json

from peftkit.cli.main import main
from peftkit.cli.runconfig import resolve
from peftkit.cli.train import build_parser, method_spec

from .conftest import tiny_cls_args


def test_methods_lists_the_adapter(capsys):
    assert main(["methods"]) == 0
    assert "adapter" in capsys.readouterr().out.split()


def test_every_adapter_option_is_a_flag():
    spec = method_spec("adapter")
    options = {s for a in build_parser(spec)._actions for s in a.option_strings}
    for f in dataclasses.fields(spec.config_cls):
        if f.name not in ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode"):
            assert "--" + f.name.replace("_", "-") in options, f.name


def test_lora_target_presets_leave_the_placement_in_charge():
    cfg = resolve({"placement": "houlsby", "reduction_factor": 4}, {}, method_spec("adapter"))
    assert cfg.method_config.target_modules is None and cfg.method_config.placement == "houlsby"


def test_train_inspect_and_refused_merge(tmp_path, tiny_bert_dir, reviews_jsonl, capsys):
    out = tmp_path / "run"
    args = tiny_cls_args(tiny_bert_dir, reviews_jsonl, out, "--method", "adapter", "--placement", "houlsby")
    i = args.index("--target-modules")
    del args[i:i + 3]  # placement picks the targets
    assert main(args) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["target_modules"] == ["output.dense"]
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "problems:    none" in capsys.readouterr().out
    assert main(["merge", str(out), "--output-dir", str(tmp_path / "merged")]) != 0
    assert "cannot be merged" in capsys.readouterr().err and not (tmp_path / "merged").exists()
