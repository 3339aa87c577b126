"""Label masking checked token by token on the real SmolLM2 tokenizer and chat template."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit.data import (
    IGNORE_INDEX,
    CausalLMCollator,
    build_causal_lm_dataset,
    encode_qa,
    encode_text,
    prompt_batch,
    prompt_ids,
    qa_pairs,
)

END_OF_TURN = "<|im_end|>"


def _answer_part(labels):
    return [t for t in labels if t != IGNORE_INDEX]


def test_prompt_is_masked_and_answer_is_labelled_token_by_token(smollm2_tokenizer):
    tok = smollm2_tokenizer
    feature = encode_qa(tok, "What is AI?", "A branch of computer science.", max_length=512)
    prompt = prompt_ids(tok, "What is AI?")
    ids, labels = feature["input_ids"], feature["labels"]
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):]
    assert tok.decode(ids[len(prompt):]) == "A branch of computer science." + END_OF_TURN
    assert ids[-1] == tok.convert_tokens_to_ids(END_OF_TURN)


def test_every_corpus_pair_labels_exactly_its_answer(smollm2_tokenizer):
    tok = smollm2_tokenizer
    for pair in qa_pairs():
        feature = encode_qa(tok, pair["question"], pair["answer"], max_length=4096)
        assert tok.decode(_answer_part(feature["labels"])) == pair["answer"] + END_OF_TURN, pair


def test_ids_match_the_chat_template_rendering(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    full = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    feature = encode_qa(tok, "Hi", "Hello there.", max_length=512)
    assert full[: len(feature["input_ids"])] == feature["input_ids"]
    assert tok.decode(full[len(feature["input_ids"]):]) == "\n"  # only the template's trailing newline is cut


def test_truncation_cuts_from_the_end(smollm2_tokenizer):
    full = encode_qa(smollm2_tokenizer, "What is AI?", "A long answer " * 20, max_length=4096)
    cut = encode_qa(smollm2_tokenizer, "What is AI?", "A long answer " * 20, max_length=50)
    assert cut == {"input_ids": full["input_ids"][:50], "labels": full["labels"][:50]}


def test_plain_text_is_labelled_on_every_token_and_ends_with_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    feature = encode_text(tok, "To be, or not to be", max_length=64)
    assert feature["labels"] == feature["input_ids"]
    assert feature["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(feature["input_ids"][:-1]) == "To be, or not to be"


def test_examples_whose_prompt_fills_max_length_are_dropped_with_a_warning(smollm2_tokenizer):
    prompt_len = len(prompt_ids(smollm2_tokenizer, "Hi"))
    records = [{"question": "Hi", "answer": "Hello"}, {"text": "short text"}]
    with pytest.warns(UserWarning, match="dropped 1 of 2 examples"):
        dataset = build_causal_lm_dataset(records, smollm2_tokenizer, max_length=prompt_len)
    assert len(dataset) == 1 and dataset[0]["labels"] == dataset[0]["input_ids"]


def test_all_examples_dropped_is_an_error(smollm2_tokenizer):
    with pytest.raises(ValueError, match="raise max_length"):
        build_causal_lm_dataset([{"question": "Hi", "answer": "Hello"}], smollm2_tokenizer, max_length=4)


def test_record_without_known_fields_explains_both_shapes(smollm2_tokenizer):
    with pytest.raises(ValueError, match="needs 'question' and 'answer'.*or 'text'"):
        build_causal_lm_dataset([{"prompt": "x"}], smollm2_tokenizer)


def test_tokenizer_without_chat_template_is_rejected(minilm_tokenizer):
    with pytest.raises(ValueError, match="has no chat template"):
        encode_qa(minilm_tokenizer, "q", "a", max_length=32)


def test_collate_right_pads_with_masked_labels(smollm2_tokenizer):
    records = [{"question": "What is AI?", "answer": "A field."}, {"text": "hi"}]
    dataset = build_causal_lm_dataset(records, smollm2_tokenizer, max_length=128)
    batch = CausalLMCollator.for_tokenizer(smollm2_tokenizer)(dataset.features)
    long_len, short_len = (len(f["input_ids"]) for f in dataset.features)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, long_len)
    assert batch["attention_mask"][1].tolist() == [1] * short_len + [0] * (long_len - short_len)
    assert batch["labels"][1, short_len:].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][1, short_len:].eq(smollm2_tokenizer.pad_token_id).all()


def test_model_loss_covers_only_answer_tokens(smollm2_tokenizer):
    """HF shifts labels inside the model; the loss must equal cross-entropy over the answer tokens."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config)
    records = [{"question": "What is AI?", "answer": "A field."}, {"question": "Hi", "answer": "Hello"}]
    features = build_causal_lm_dataset(records, smollm2_tokenizer).features
    batch = CausalLMCollator.for_tokenizer(smollm2_tokenizer)(features)
    out = model(**batch)
    logits, targets = out.logits[:, :-1], batch["labels"][:, 1:]  # (batch, seq - 1, vocab), (batch, seq - 1)
    keep = targets != IGNORE_INDEX
    assert keep.sum().item() == sum(len(_answer_part(f["labels"])) for f in features)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits[keep], targets[keep]))


def test_prompt_batch_left_pads_for_generation(smollm2_tokenizer):
    questions = ["Hi", "What is the capital of France?"]
    batch = prompt_batch(smollm2_tokenizer, questions)
    for row, question in enumerate(questions):
        ids = prompt_ids(smollm2_tokenizer, question)
        assert batch["input_ids"][row, -len(ids):].tolist() == ids
        assert batch["attention_mask"][row].sum().item() == len(ids)
    assert smollm2_tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
