"""A peftkit-wrapped model trains in Hugging Face's transformers.Trainer unchanged."""

import torch
from transformers import BertConfig, BertForSequenceClassification
from transformers import Trainer as HFTrainer
from transformers import TrainingArguments as HFArgs

from peftkit import LoraConfig, PeftModel, get_peft_model


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config)


def examples(n=32):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (n, 8), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": int(ids[i, 0] > 32)} for i in range(n)]


def train_in_hf_trainer(tmp_path, **extra):
    model = get_peft_model(tiny_bert(), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                   target_modules=["query", "value"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = HFArgs(output_dir=str(tmp_path / "hf"), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                  report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, **extra)
    result = HFTrainer(model=model, args=args, train_dataset=examples()).train()
    assert result.global_step == 4
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter")
    batch = {k: torch.stack([torch.as_tensor(e[k]) for e in examples(4)]) for k in ("input_ids", "attention_mask")}
    model.eval(), reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)


def test_hf_trainer_trains_the_adapter_and_leaves_the_base_frozen(tmp_path):
    train_in_hf_trainer(tmp_path, remove_unused_columns=False)


def test_hf_trainer_default_arguments_keep_the_dataset_columns(tmp_path):
    train_in_hf_trainer(tmp_path)
