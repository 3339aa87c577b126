"""TrainingArguments.fused_kernels: the trainer runs patch_model (and a bf16 frozen base) when asked."""
import torch

import peftkit.kernels.patch as patch_module
from peftkit import LoraConfig, get_peft_model
from peftkit.train import Trainer, TrainingArguments
from tiny_models import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_llama():
    torch.manual_seed(1)
    return get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                         task_type="CAUSAL_LM", init_lora_weights="gaussian"))


def lm_examples(n=24, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, seq), generator=g)
    ids[:, 1::2] = ids[:, 0::2]  # a learnable pattern: every odd token repeats the one before it
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def trainer(model, **kw):
    args = TrainingArguments(**{**dict(progress_bar=False, tensorboard=False, device="cpu", task="causal-lm",
                                       learning_rate=5e-3, batch_size=8, max_steps=20, lr_scheduler="constant"), **kw})
    data = lm_examples(16)
    return Trainer(model, args, data, data)


def test_auto_leaves_a_cpu_model_as_it_is():
    model = lora_llama()
    t = trainer(model)
    assert t.patched is None
    assert all("forward" not in m.__dict__ for m in model.base_model.model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_on_with_bf16_runs_a_bf16_frozen_base_through_the_fused_nodes_and_learns(monkeypatch):
    calls = []
    real = patch_module.lora_linears_shared
    monkeypatch.setattr(patch_module, "lora_linears_shared", lambda x, layers: calls.append(x.dtype) or real(x, layers))
    model = lora_llama()
    t = trainer(model, fused_kernels="on", precision="bf16")
    assert t.patched is not None and len(t.patched.mlp) == 2 and len(t.patched.causal_lm_loss) == 1
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    before = t.evaluate()["loss"]
    t.train()
    after = t.evaluate()["loss"]
    assert calls and set(calls) == {torch.bfloat16}  # q/k/v and gate/up went through the shared node in bf16
    reference = trainer(lora_llama(), precision="bf16")  # fp32 base under bf16 autocast, no fused kernels
    reference.train()
    assert after < before - 0.2, (before, after)
    assert abs(after - reference.evaluate()["loss"]) < 0.02


def test_on_in_fp32_patches_without_casting_and_matches_the_unpatched_run():
    plain, fused = lora_llama(), lora_llama()
    trainer(plain, max_steps=3).train()
    t = trainer(fused, fused_kernels="on", max_steps=3)
    t.train()
    assert t.patched is not None and all(p.dtype == torch.float32 for p in fused.parameters())
    for (name, a), (_, b) in zip(plain.named_parameters(), fused.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_a_model_the_kernels_do_not_know_is_left_in_its_own_dtype():
    from tiny_models import tiny_bert

    model = get_peft_model(tiny_bert(seed=0), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    args = TrainingArguments(progress_bar=False, tensorboard=False, device="cpu", fused_kernels="on", precision="bf16")
    assert Trainer(model, args).patched is None
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_autocast_is_skipped_only_where_it_would_change_nothing_and_training_is_then_identical():
    from peftkit import DoraConfig

    t = trainer(lora_llama(), fused_kernels="on", precision="bf16")
    assert t.autocast_redundant  # a bf16 base and LoRA factors that the LoRA layers cast themselves
    assert not trainer(lora_llama(), precision="bf16").autocast_redundant  # CPU, auto: not patched, fp32 base
    dora = get_peft_model(tiny_llama(seed=0), DoraConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM"))
    assert not trainer(dora, fused_kernels="on", precision="bf16").autocast_redundant  # its magnitudes: autocast
    saved = get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM",
                                                          modules_to_save=["lm_head"]))
    assert not trainer(saved, fused_kernels="on", precision="bf16").autocast_redundant  # a trained fp32 copy

    runs = []
    for skip in (True, False):
        model = lora_llama()
        t = trainer(model, fused_kernels="on", precision="bf16", max_steps=6)
        t.autocast_redundant = skip
        t.train()
        runs.append({k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad})
    for key, value in runs[1].items():
        torch.testing.assert_close(runs[0][key], value, rtol=0, atol=0, msg=key)
