"""Packing: the bin packing, the rows, the collator and the refusal of models that would mix rows."""

from __future__ import annotations

import math
import random

import pytest
import torch
from tiny_models import tiny_llama

import peftkit
from peftkit.data import IGNORE_INDEX, CausalLMCollator, FeatureDataset, build_causal_lm_dataset, qa_pairs
from peftkit.data.packing import (
    PackedCollator,
    check_packing_support,
    is_packed,
    pack_dataset,
    pack_lengths,
    packed_row,
)


def best_fit_decreasing_reference(lengths: list[int], max_length: int) -> list[list[int]]:
    """The textbook algorithm, scanning every row: longest first, into the fullest row that fits."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: (room[r], r))
        else:
            r = len(rows)
            rows.append([])
            room.append(max_length)
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_pack_lengths_is_best_fit_decreasing_and_places_everything_once(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 300))]
    rows = pack_lengths(lengths, 64)
    assert rows == best_fit_decreasing_reference(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) <= math.ceil(11 / 9 * math.ceil(sum(lengths) / 64)) + 1  # BFD's bound over optimal
    assert pack_lengths(lengths, 64) == rows  # deterministic


def test_an_example_longer_than_a_row_keeps_a_row_of_its_own():
    rows = pack_lengths([5, 20, 3, 12], 10)
    assert [20] in [[[5, 20, 3, 12][i] for i in row] for row in rows]
    assert [1] in rows and sorted(i for row in rows for i in row) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="max_length must be at least 1"):
        pack_lengths([3], 0)


def test_a_packed_row_restarts_positions_and_masks_each_first_label():
    row = packed_row([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                      {"input_ids": [8, 9], "labels": [8, 9]},
                      {"input_ids": [4], "labels": [4]}])
    assert row == {"input_ids": [5, 6, 7, 8, 9, 4], "labels": [-100, 6, 7, -100, 9, -100],
                   "position_ids": [0, 1, 2, 0, 1, 0]}
    with pytest.raises(ValueError, match="equal, non-zero lengths"):
        packed_row([{"input_ids": [1, 2], "labels": [1]}])


def test_collator_pads_rows_with_their_own_position_run_and_leaves_plain_examples_to_the_causal_collator():
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, -100, 8], "position_ids": [0, 1, 0, 1]},
            {"input_ids": [9, 3], "labels": [-100, 3], "position_ids": [0, 1]}]
    batch = PackedCollator(pad_token_id=2)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"} and batch["use_cache"] is False
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 3, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, -100, 8], [-100, 3, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]
    plain = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [9], "labels": [9]}]
    expected = CausalLMCollator(2)(plain)
    assert {k: v.tolist() for k, v in PackedCollator(2)(plain).items()} == {k: v.tolist() for k, v in expected.items()}
    with pytest.raises(ValueError, match="mixes 1 packed rows with 1 plain"):
        PackedCollator(2)([rows[0], plain[0]])


def test_pack_dataset_refuses_what_it_cannot_pack():
    with pytest.raises(ValueError, match="empty dataset"):
        pack_dataset(FeatureDataset([]), 8)
    with pytest.raises(ValueError, match=r"lacks \['labels'\].*build_causal_lm_dataset"):
        pack_dataset(FeatureDataset([{"input_ids": [1, 2]}]), 8)


def test_bundled_qa_data_packs_into_fewer_rows_with_the_same_label_tokens(smollm2_tokenizer):
    data = build_causal_lm_dataset(qa_pairs(), smollm2_tokenizer, max_length=96)
    packed = pack_dataset(data, 96)
    assert is_packed(packed) and not is_packed(data)
    assert packed.n_examples == len(data) and len(packed) < 0.75 * len(data)
    assert max(len(r["input_ids"]) for r in packed.rows) <= 96
    assert packed.n_tokens == sum(len(e["input_ids"]) for e in data)

    def targets(features):  # label tokens the model's shifted loss counts
        return sum(sum(label != IGNORE_INDEX for label in f["labels"][1:]) for f in features)

    assert targets(packed.rows) == targets(data)


def probe_data() -> FeatureDataset:
    return pack_dataset(FeatureDataset([{"input_ids": [3, 9, 4, 7, 1], "labels": [3, 9, 4, 7, 1]},
                                        {"input_ids": [8, 2, 6], "labels": [8, 2, 6]}]), 16)


@pytest.mark.filterwarnings("ignore:position_ids are ignored with prompt tuning")
def test_packing_probe_accepts_lora_and_refuses_methods_that_attend_across_rows():
    lora = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora.train()
    assert check_packing_support(lora, probe_data()) < 1e-5
    assert lora.training  # the mode is restored
    for config in (peftkit.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
                   peftkit.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")):
        model = peftkit.get_peft_model(tiny_llama(), config)
        with pytest.raises(ValueError, match="does not keep packed sequences apart.*train this one without"):
            check_packing_support(model, probe_data())


def test_packing_probe_tolerance_follows_the_autocast_dtype():
    model = tiny_llama()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert check_packing_support(model, probe_data()) < 5e-2
