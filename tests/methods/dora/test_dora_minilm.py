"""DoRA on the real pretrained MiniLM encoder and real review snippets: held-out accuracy must rise
well above chance within a short CPU run (under a minute on an idle 2-core machine)."""
from __future__ import annotations

import time

import pytest
import torch

from peftkit import DoraConfig, PeftModel, get_peft_model
from peftkit.data import ClassificationCollator, assets, build_classification_dataset, train_eval_split
from peftkit.methods.dora.layer import DoraLinear

pytestmark = pytest.mark.slow


def accuracy(model, loader) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for batch in loader:
            labels = batch.pop("labels")
            right += (model(**batch).logits.argmax(-1) == labels).sum().item()
            total += len(labels)
    return right / total


def test_dora_fine_tune_of_minilm_beats_chance(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    start = time.time()
    torch.manual_seed(0)
    folder = assets.minilm_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    train, held = train_eval_split(assets.review_records(), eval_fraction=0.1, seed=0, stratify_by="label")
    train_ds = build_classification_dataset(train[:2000], tok, max_length=48)
    held_ds = build_classification_dataset(held[:400], tok, label2id=train_ds.label2id, max_length=48)
    collate = ClassificationCollator.for_tokenizer(tok)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=32, shuffle=True, collate_fn=collate)
    held_loader = torch.utils.data.DataLoader(held_ds, batch_size=100, collate_fn=collate)

    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    model = get_peft_model(base, DoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"]))
    assert any(isinstance(m, DoraLinear) for m in model.modules())
    before = accuracy(model, held_loader)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for batch in loader:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    after = accuracy(model, held_loader)
    assert after >= 0.68 and after >= before + 0.1, (before, after)

    model.save_pretrained(tmp_path)  # the saved adapter reproduces the measured accuracy
    reloaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2), tmp_path)
    assert accuracy(reloaded, held_loader) == after
    print(f"minilm dora: held-out accuracy {before:.3f} -> {after:.3f} in {time.time() - start:.0f} s")
