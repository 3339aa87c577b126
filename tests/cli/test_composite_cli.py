"""`peftkit train/eval/inspect` with the composite methods: each part's options are one flag taking
a YAML mapping (``--prefix-tuning '{num_virtual_tokens: 5}'``), over the method's paper defaults."""

import json

import pytest

from peftkit.cli.main import main
from peftkit.cli.runconfig import resolve
from peftkit.cli.train import method_spec

from .conftest import tiny_cls_args

PART_FLAGS = {
    "mam": ["--prefix-tuning", "{num_virtual_tokens: 4}", "--parallel-adapter", "{bottleneck_size: 8}"],
    "unipelt": ["--prefix-tuning", "{num_virtual_tokens: 4}", "--lora", "{r: 4}", "--adapter", "{reduction_factor: 8}",
                "--gates"],
}


def composite_args(*args) -> list[str]:
    """tiny_cls_args without --target-modules: each part picks its own targets (set in its mapping)."""
    args = tiny_cls_args(*args)
    i = args.index("--target-modules")
    return args[:i] + args[i + 3:]


@pytest.mark.parametrize("method", sorted(PART_FLAGS))
def test_part_flags_merge_over_the_method_defaults(method):
    cfg = resolve({"prefix_tuning": {"num_virtual_tokens": 4}}, {}, method_spec(method)).method_config
    assert cfg.prefix_tuning == {"num_virtual_tokens": 4} and cfg.peft_type == method.upper()


@pytest.mark.parametrize("method", sorted(PART_FLAGS))
def test_classification_run_trains_reloads_and_inspects(method, tmp_path, tiny_bert_dir, reviews_jsonl, capsys):
    out = tmp_path / "run"
    args = composite_args(tiny_bert_dir, reviews_jsonl, out, "--method", method, *PART_FLAGS[method])
    assert main(args) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper() and config["prefix_tuning"]["num_virtual_tokens"] == 4
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert abs(json.loads(capsys.readouterr().out)["accuracy"] - summary["after"]) < 1e-6
    assert main(["inspect", str(out / "adapter")]) == 0
    report = capsys.readouterr().out
    assert method.upper() in report and "problems:    none" in report


def test_a_wrong_part_option_is_a_user_error(tmp_path, tiny_bert_dir, reviews_jsonl, capsys):
    args = composite_args(tiny_bert_dir, reviews_jsonl, tmp_path / "run", "--method", "mam",
                         "--parallel-adapter", "{bottleneck: 8}")
    assert main(args) != 0
    assert "parallel_adapter has unknown option(s) ['bottleneck']" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
