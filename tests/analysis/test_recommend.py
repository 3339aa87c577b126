"""The recommender's ranking and reasons follow from the estimates and the user's constraints."""
import pytest

from peftkit.analysis.memory import GIB, MemoryOptions
from peftkit.analysis.recommend import Constraints, recommend
from peftkit.analysis.shapes import source
from peftkit.cli import skeleton
from peftkit.cli.train import method_spec

LLAMA_8B = source("llama-3-8b", "causal-lm")
SHORT = MemoryOptions(batch_size=1, seq_len=512)


def configs(src, names=("lora", "ia3", "adapter", "prompt")) -> dict:
    return {n: skeleton.method_config(method_spec(n), src.task, src.name, {}) for n in names}


def by_name(ranked) -> dict:
    return {c.name: c for c in ranked}


def test_a_budget_too_small_for_bf16_lora_of_an_8b_recommends_qlora():
    ranked = recommend(LLAMA_8B, configs(LLAMA_8B, ("lora",)), SHORT, Constraints(gpu_memory_gib=16))
    found = by_name(ranked)
    assert ranked[0].name == "qlora" and ranked[0].fits
    assert not found["lora"].fits and not found["full"].fits
    assert found["lora"].estimate.total > 0.9 * 16 * GIB >= found["qlora"].estimate.total
    assert any("4-bit base is what makes it fit" in r for r in ranked[0].reasons)
    assert any(r.startswith("does not fit") for r in found["full"].reasons)


def test_when_bf16_lora_fits_it_ranks_above_qlora():
    found = by_name(recommend(LLAMA_8B, configs(LLAMA_8B, ("lora",)), SHORT, Constraints(gpu_memory_gib=80)))
    assert found["lora"].fits and found["lora"].score > found["qlora"].score
    assert any("fits without quantizing" in r for r in found["qlora"].reasons)


def test_needing_zero_latency_ranks_mergeable_methods_first():
    src = source("minilm", "classification")
    ranked = recommend(src, configs(src), MemoryOptions(batch_size=8, seq_len=64),
                       Constraints(gpu_memory_gib=16, data_size=2000, need_merge=True))
    merge_first = [c.estimate.mergeable or c.method == "full" for c in ranked]
    assert merge_first == sorted(merge_first, reverse=True)  # every mergeable one before any that is not
    adapter = by_name(ranked)["adapter"]
    assert any("cannot be merged" in r for r in adapter.reasons)
    without = by_name(recommend(src, configs(src), MemoryOptions(batch_size=8, seq_len=64),
                                Constraints(gpu_memory_gib=16, data_size=2000)))
    assert adapter.score == pytest.approx(without["adapter"].score - 4)


def test_multi_adapter_serving_demotes_full_finetuning_and_input_level_methods():
    src = source("minilm", "classification")
    opts, plenty = MemoryOptions(batch_size=8, seq_len=64), dict(gpu_memory_gib=80, data_size=500_000)
    alone = by_name(recommend(src, configs(src), opts, Constraints(**plenty)))
    multi = by_name(recommend(src, configs(src), opts, Constraints(**plenty, multi_adapter=True)))
    assert alone["full"].score > alone["lora"].score  # much data, memory to spare: full wins alone
    assert multi["lora"].score > multi["full"].score
    assert any("one full model copy per task" in r for r in multi["full"].reasons)
    assert any("cannot serve different adapters in one batch" in r for r in multi["prompt"].reasons)


def test_small_data_prefers_fewer_trainable_parameters():
    src = source("minilm", "classification")
    found = by_name(recommend(src, configs(src), MemoryOptions(batch_size=8, seq_len=32),
                              Constraints(gpu_memory_gib=80, data_size=50)))
    assert found["full"].score < found["lora"].score
    assert any("risks overfitting" in r for r in found["full"].reasons)


def test_constraints_are_checked():
    with pytest.raises(ValueError, match="gpu_memory_gib"):
        Constraints(gpu_memory_gib=0)
    with pytest.raises(ValueError, match="data_size"):
        Constraints(gpu_memory_gib=8, data_size=0)


def test_methods_that_refuse_gradient_checkpointing_are_not_recommended_with_it():
    opts = MemoryOptions(batch_size=1, seq_len=512, gradient_checkpointing=True)
    found = by_name(recommend(LLAMA_8B, configs(LLAMA_8B, ("lora", "prefix")), opts, Constraints(gpu_memory_gib=80)))
    assert found["lora"].fits and not found["prefix"].fits
    assert "cannot train under gradient checkpointing" in found["prefix"].reasons[0]
    plain = by_name(recommend(LLAMA_8B, configs(LLAMA_8B, ("prefix",)), SHORT, Constraints(gpu_memory_gib=80)))
    assert plain["prefix"].fits
