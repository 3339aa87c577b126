import pickle

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from peftkit.data import ClassificationCollator, build_classification_dataset, check_num_labels, label_mapping

RECORDS = [
    {"text": "a wonderful, moving film", "label": "fresh"},
    {"text": "dull", "label": "rotten"},
    {"text": "the best thing this year, and I have seen many things", "label": "fresh"},
]


def test_label_mapping_sorts_string_labels():
    assert label_mapping(["rotten", "fresh", "rotten"]) == {"fresh": 0, "rotten": 1}


def test_label_mapping_keeps_integer_labels_as_integers():
    mapping = label_mapping([2, 0, 1, 0])
    assert mapping == {0: 0, 1: 1, 2: 2}
    assert all(isinstance(k, int) for k in mapping)


def test_label_mapping_rejects_mixed_types():
    with pytest.raises(ValueError, match=r"labels mix types \['int', 'str'\]"):
        label_mapping([1, "1"])


def test_num_labels_mismatch_names_both_numbers_and_the_fix():
    expected = r"data has 3 labels .* model has num_labels=2; load the model with num_labels=3"
    with pytest.raises(ValueError, match=expected):
        check_num_labels({"a": 0, "b": 1, "c": 2}, 2)
    check_num_labels({"a": 0, "b": 1}, 2)


def test_dataset_maps_labels_and_keeps_the_mapping(minilm_tokenizer):
    dataset = build_classification_dataset(RECORDS, minilm_tokenizer)
    assert dataset.label2id == {"fresh": 0, "rotten": 1}
    assert [dataset[i]["labels"] for i in range(3)] == [0, 1, 0]


def test_eval_set_reuses_the_train_mapping(minilm_tokenizer):
    dataset = build_classification_dataset(RECORDS[1:2], minilm_tokenizer, label2id={"fresh": 0, "rotten": 1})
    assert dataset[0]["labels"] == 1


def test_unknown_label_in_eval_set_is_named(minilm_tokenizer):
    with pytest.raises(ValueError, match="label 'meh', which is not among"):
        build_classification_dataset([{"text": "x", "label": "meh"}], minilm_tokenizer, label2id={"fresh": 0})


def test_missing_field_points_to_select_columns(minilm_tokenizer):
    with pytest.raises(ValueError, match=r"record 0 lacks field\(s\) \['label'\].*select_columns"):
        build_classification_dataset([{"text": "x"}], minilm_tokenizer)


def test_examples_are_truncated_to_max_length(minilm_tokenizer):
    dataset = build_classification_dataset(RECORDS, minilm_tokenizer, max_length=5)
    assert max(len(f["input_ids"]) for f in dataset.features) == 5


def test_collate_pads_to_the_longest_example(minilm_tokenizer):
    dataset = build_classification_dataset(RECORDS, minilm_tokenizer)
    lengths = [len(dataset[i]["input_ids"]) for i in range(3)]
    batch = ClassificationCollator.for_tokenizer(minilm_tokenizer)([dataset[i] for i in range(3)])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert batch[key].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    short = lengths[1]
    assert batch["input_ids"][1, short:].eq(minilm_tokenizer.pad_token_id).all()
    assert batch["input_ids"][1, :short].tolist() == dataset[1]["input_ids"]
    assert batch["labels"].tolist() == [0, 1, 0] and batch["labels"].dtype == torch.long


def test_collate_omits_token_type_ids_when_the_tokenizer_has_none(smollm2_tokenizer):
    dataset = build_classification_dataset(RECORDS, smollm2_tokenizer)
    batch = ClassificationCollator.for_tokenizer(smollm2_tokenizer)(dataset.features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_batches_feed_a_sequence_classifier_through_a_dataloader(minilm_tokenizer):
    collator = ClassificationCollator.for_tokenizer(minilm_tokenizer)
    assert pickle.loads(pickle.dumps(collator)) == collator  # DataLoader workers need to pickle it
    dataset = build_classification_dataset(RECORDS, minilm_tokenizer)
    config = BertConfig(
        vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, num_labels=len(dataset.label2id),
    )
    model = BertForSequenceClassification(config)
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collator)))
    out = model(**batch)
    assert out.logits.shape == (3, 2) and torch.isfinite(out.loss)
