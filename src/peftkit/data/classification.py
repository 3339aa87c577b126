"""Tokenised sequence-classification datasets: ``{"text", "label"} -> input_ids, labels``.

Label ids come from the sorted set of labels, so the same labels always give the same ids whatever
order the file lists them in; the train and eval sets must share one ``label2id``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

import torch

from peftkit.data.batching import FeatureDataset, attention_mask, check_multiple, pad_right, pad_token_id


def label_mapping(labels: Iterable[Hashable]) -> dict[Hashable, int]:
    """``label2id`` from the sorted distinct labels: ``["rotten", "fresh"] -> {"fresh": 0, "rotten": 1}``.

    Integer labels stay integers (``{0: 0, 1: 1}``), so data already encoded as ids keeps its ids
    when they are 0..n-1.
    """
    distinct = set(labels)
    try:
        ordered = sorted(distinct)
    except TypeError as e:
        kinds = sorted({type(x).__name__ for x in distinct})
        raise ValueError(f"labels mix types {kinds}; make them all strings or all integers") from e
    return {label: i for i, label in enumerate(ordered)}


def check_num_labels(label2id: Mapping[Hashable, int], num_labels: int) -> None:
    """Fail early when the model's classification head does not match the data's label count."""
    if len(label2id) != num_labels:
        raise ValueError(
            f"the data has {len(label2id)} labels {list(label2id)} but the model has num_labels={num_labels}; "
            f"load the model with num_labels={len(label2id)} "
            "(e.g. AutoModelForSequenceClassification.from_pretrained(path, num_labels=...))"
        )


def build_classification_dataset(
    records: list[dict], tokenizer, *, label2id: Mapping[Hashable, int] | None = None, max_length: int = 128
) -> FeatureDataset:
    """Tokenise ``{"text", "label"}`` records (unpadded, truncated to ``max_length``).

    Pass the training set's ``label2id`` when building the eval set; the mapping used is kept on the
    returned dataset as ``dataset.label2id``.
    """
    _check_fields(records, ("text", "label"))
    label2id = dict(label2id) if label2id is not None else label_mapping(r["label"] for r in records)
    encoded = tokenizer([str(r["text"]) for r in records], truncation=True, max_length=max_length)
    features = [_feature(encoded, i, label2id, r["label"]) for i, r in enumerate(records)]
    return FeatureDataset(features, label2id)


def _feature(encoded, index: int, label2id: Mapping[Hashable, int], label: Hashable) -> dict:
    if label not in label2id:
        raise ValueError(
            f"record {index} has label {label!r}, which is not among {list(label2id)}; "
            "build label2id from the labels of all splits"
        )
    feature = {"input_ids": encoded["input_ids"][index], "labels": label2id[label]}
    if "token_type_ids" in encoded:
        feature["token_type_ids"] = encoded["token_type_ids"][index]
    return feature


def _check_fields(records: list[dict], fields: tuple[str, ...]) -> None:
    if not records:
        raise ValueError("no records to build a dataset from; check the input file or the split")
    for i, record in enumerate(records):
        missing = [f for f in fields if f not in record]
        if missing:
            raise ValueError(
                f"record {i} lacks field(s) {missing} (it has {list(record)}); "
                "rename columns with select_columns(records, {'text': ..., 'label': ...})"
            )


@dataclass(frozen=True)
class ClassificationCollator:
    """Pads a batch of classification features to its longest example (right padding).

    A dataclass rather than a closure so DataLoader worker processes can pickle it.
    """

    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __post_init__(self) -> None:
        check_multiple(self.pad_to_multiple_of)

    @classmethod
    def for_tokenizer(cls, tokenizer, pad_to_multiple_of: int = 1) -> ClassificationCollator:
        return cls(pad_token_id(tokenizer), pad_to_multiple_of)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids, multiple = [f["input_ids"] for f in features], self.pad_to_multiple_of
        batch = {"input_ids": pad_right(ids, self.pad_token_id, multiple), "attention_mask": attention_mask(ids, multiple)}
        if "token_type_ids" in features[0]:
            batch["token_type_ids"] = pad_right([f["token_type_ids"] for f in features], 0, multiple)
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return batch
