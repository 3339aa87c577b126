from collections import Counter

import pytest

from peftkit.data import train_eval_split


def _records(n_fresh=90, n_rotten=10):
    labels = ["fresh"] * n_fresh + ["rotten"] * n_rotten
    return [{"text": f"t{i}", "label": label} for i, label in enumerate(labels)]


def _texts(records):
    return [r["text"] for r in records]


def test_same_seed_gives_the_same_split():
    first = train_eval_split(_records(), eval_fraction=0.2, seed=3)
    second = train_eval_split(_records(), eval_fraction=0.2, seed=3)
    assert first == second


def test_different_seeds_give_different_splits():
    a = train_eval_split(_records(), eval_fraction=0.2, seed=0)[1]
    b = train_eval_split(_records(), eval_fraction=0.2, seed=1)[1]
    assert set(_texts(a)) != set(_texts(b))


def test_split_is_a_partition_of_the_input():
    records = _records()
    train, evals = train_eval_split(records, eval_fraction=0.25, seed=0)
    assert len(evals) == 25
    assert sorted(_texts(train) + _texts(evals)) == sorted(_texts(records))


def test_stratified_split_keeps_label_proportions():
    train, evals = train_eval_split(_records(), eval_fraction=0.2, seed=0, stratify_by="label")
    assert Counter(r["label"] for r in evals) == {"fresh": 18, "rotten": 2}
    assert Counter(r["label"] for r in train) == {"fresh": 72, "rotten": 8}


def test_stratified_split_gives_a_rare_class_one_eval_example():
    _, evals = train_eval_split(_records(n_fresh=50, n_rotten=3), eval_fraction=0.05, seed=0, stratify_by="label")
    assert Counter(r["label"] for r in evals)["rotten"] == 1


def test_split_output_is_shuffled_not_grouped_by_label():
    train, _ = train_eval_split(_records(50, 50), eval_fraction=0.2, seed=0, stratify_by="label")
    labels = [r["label"] for r in train]
    assert labels != sorted(labels) and labels != sorted(labels, reverse=True)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_eval_fraction_out_of_range_is_rejected(fraction):
    with pytest.raises(ValueError, match="eval_fraction must be between 0 and 1"):
        train_eval_split(_records(), eval_fraction=fraction)


def test_stratify_key_missing_names_the_record():
    records = _records(2, 2) + [{"text": "no label"}]
    with pytest.raises(ValueError, match="cannot stratify by 'label': record 4"):
        train_eval_split(records, stratify_by="label")


def test_too_few_records_are_rejected():
    with pytest.raises(ValueError, match="at least 2 records"):
        train_eval_split([{"text": "only"}])
