"""pad_to_multiple_of: every collator rounds its batch length up, and padding stays inert."""
import pytest
import torch

from peftkit.data import CausalLMCollator, ClassificationCollator
from peftkit.data.batching import IGNORE_INDEX
from peftkit.data.packing import PackedCollator


def test_causal_lm_batches_round_up_with_masked_padding_and_ignored_labels():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8] * 9, "labels": [8] * 9}]
    batch = CausalLMCollator(0, pad_to_multiple_of=8)(features)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (2, 16) for k in ("input_ids", "attention_mask",
                                                                                    "labels")}
    assert batch["attention_mask"].sum(1).tolist() == [3, 9]
    assert (batch["labels"][0, 3:] == IGNORE_INDEX).all() and (batch["input_ids"][1, 9:] == 0).all()
    plain = CausalLMCollator(0)(features)
    assert plain["input_ids"].shape == (2, 9)
    assert torch.equal(batch["input_ids"][:, :9], plain["input_ids"])  # the same batch, only longer


def test_an_exact_multiple_is_left_as_it_is_and_classification_pads_every_token_field():
    features = [{"input_ids": [1, 2, 3, 4], "token_type_ids": [0, 0, 1, 1], "labels": 1},
                {"input_ids": [1, 2], "token_type_ids": [0, 0], "labels": 0}]
    assert ClassificationCollator(0, 4)(features)["input_ids"].shape == (2, 4)
    batch = ClassificationCollator(0, 3)(features)
    assert batch["input_ids"].shape == batch["token_type_ids"].shape == batch["attention_mask"].shape == (2, 6)
    assert batch["labels"].tolist() == [1, 0]


def test_packed_rows_continue_their_position_runs_to_the_rounded_length():
    rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "position_ids": [0, 1, 0]}]
    batch = PackedCollator(0, pad_to_multiple_of=4)(rows)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3, IGNORE_INDEX]]
    plain = PackedCollator(0, pad_to_multiple_of=4)([{"input_ids": [1], "labels": [1]}])
    assert plain["input_ids"].shape == (1, 4) and plain["attention_mask"].tolist() == [[1, 0, 0, 0]]


@pytest.mark.parametrize("collator", [CausalLMCollator, ClassificationCollator, PackedCollator])
@pytest.mark.parametrize("bad", [0, -8, 2.5])
def test_a_multiple_that_is_not_a_positive_int_is_refused(collator, bad):
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive int"):
        collator(0, bad)
