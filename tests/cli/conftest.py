"""Fixtures for the CLI tests: tiny random models saved as real model folders, and small data files.

The tiny models reuse the bundled tokenizers (MiniLM's WordPiece, SmolLM2's BPE with its chat
template), so the CLI runs its real code path in a second or two.
"""

from __future__ import annotations

import json
import random

import pytest
import torch


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def review_records(n: int = 96, seed: int = 0) -> list[dict]:
    """Synthetic two-class reviews whose label is plain from the words used."""
    rng = random.Random(seed)
    good, bad = ["great", "wonderful", "moving", "fun", "brilliant"], ["awful", "boring", "dull", "bad", "weak"]
    filler = ["the", "film", "plot", "actors", "story", "was", "really", "quite"]
    out = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(filler, 4) + rng.sample(good if label == "pos" else bad, 2)
        rng.shuffle(words)
        out.append({"review": " ".join(words), "sentiment": label, "id": i})
    return out


def qa_records(n: int = 24) -> list[dict]:
    subjects = ["cats", "dogs", "birds", "fish", "trees", "stars"]
    return [{"prompt": f"What do you think about {subjects[i % 6]} number {i}?",
             "response": f"I like {subjects[i % 6]} a lot."} for i in range(n)]


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A bare 2-layer BERT encoder (like MiniLM, no head) with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from peftkit.data.assets import minilm_dir

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_head_dir(tmp_path_factory, tiny_bert_dir):
    """A BERT that already has a 3-class head named a/b/c (for the label-mismatch error)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert-head")
    config = BertConfig.from_pretrained(tiny_bert_dir, num_labels=3, id2label={0: "a", 1: "b", 2: "c"},
                                        label2id={"a": 0, "b": 1, "c": 2})
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer Llama with SmolLM2's tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peftkit.data.assets import smollm2_dir

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def reviews_jsonl(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "reviews.jsonl", review_records())


@pytest.fixture(scope="session")
def qa_jsonl(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", qa_records())


def tiny_cls_args(model_dir, data, out, *extra) -> list[str]:
    """A fast classification run: a few steps with evaluation and checkpoints along the way."""
    return ["train", "--model", str(model_dir), "--data", str(data), "--text-column", "review",
            "--label-column", "sentiment", "--output-dir", str(out), "--target-modules", "query", "value",
            "--max-steps", "6", "--eval-steps", "3", "--batch-size", "8", "--max-length", "16",
            "--no-progress-bar", "--no-tensorboard", *extra]
