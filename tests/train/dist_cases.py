"""Small PEFT training cases shared by the torchrun worker (distributed_script.py) and the tests.

``cls``: LoRA on a tiny BERT classifier (DDP). ``lm``: LoRA on a tiny Llama, causal LM (FSDP2 shards
its decoder layers). Dropout is off so that a step's gradient depends on its examples only, not on
how they are split into micro-batches, and one process with batch B*N must match N ranks with B.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny_models import tiny_bert, tiny_llama  # noqa: E402

from peftkit import LoraConfig, get_peft_model  # noqa: E402
from peftkit.train import TrainingArguments  # noqa: E402

PER_DEVICE_BATCH = 4
PROBE = torch.arange(24).remainder(64).view(3, 8)  # fixed inputs whose outputs the tests compare


def examples(n: int, seed: int, task: str) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, 64, (8,), generator=g)
        if task == "classification":
            label = torch.tensor(int(ids[:4].sum() > ids[4:].sum()))
        else:
            label = ids.clone()
            label[: 1 + i % 5] = -100  # 1..5 masked positions: micro-batches hold different token counts
        out.append({"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": label})
    return out


def model(case: str):
    if case == "cls":
        base, targets, task_type = tiny_bert(seed=0), ["query", "value"], "SEQ_CLS"
    else:
        base, targets, task_type = tiny_llama(seed=0), ["q_proj", "v_proj", "down_proj"], "CAUSAL_LM"
    for m in base.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    torch.manual_seed(1)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task_type,
                                           init_lora_weights="gaussian"))


def data(case: str) -> tuple[list[dict], list[dict]]:
    task = "classification" if case == "cls" else "causal-lm"
    return examples(40, 0, task), examples(13, 1, task)


def args(case: str, out: str | None, world_size: int, **overrides) -> TrainingArguments:
    """The run at ``world_size`` ranks; the global batch is the same at every world size."""
    values = dict(output_dir=out, task="classification" if case == "cls" else "causal-lm",
                  batch_size=PER_DEVICE_BATCH * 2 // world_size, gradient_accumulation_steps=2, max_steps=6,
                  eval_steps=3, eval_batch_size=3, save_steps=1, learning_rate=1e-2, warmup_steps=1,
                  weight_decay=0.01, progress_bar=False, tensorboard=False, device="cpu", seed=7)
    values.update(overrides)
    return TrainingArguments(**values)
