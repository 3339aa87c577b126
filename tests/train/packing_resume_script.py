"""Run by test_packing_trainer.py in a subprocess: LoRA on a tiny Llama over packed rows, killable.

usage: python packing_resume_script.py OUT_DIR SECONDS_PER_STEP [resume]
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from tiny_models import tiny_llama  # noqa: E402

import peftkit  # noqa: E402
from peftkit.data import FeatureDataset  # noqa: E402
from peftkit.data.packing import PackedCollator, pack_dataset  # noqa: E402
from peftkit.train import Trainer, TrainingArguments  # noqa: E402

torch.set_num_threads(1)
out, delay, resume = sys.argv[1], float(sys.argv[2]), len(sys.argv) > 3


def sequences(n: int, seed: int) -> FeatureDataset:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 15, (n,), generator=g).tolist()
    out = []
    for i, length in enumerate(lengths):
        ids = torch.randint(1, 64, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (1 + i % 2) + ids[1 + i % 2:]})
    return FeatureDataset(out)


model = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=4, lora_dropout=0.2,
                                                                 target_modules=["q_proj", "v_proj"]))
model.register_forward_pre_hook(lambda *a: time.sleep(delay))
train = pack_dataset(sequences(48, seed=0), max_length=16)
args = TrainingArguments(output_dir=out, task="causal-lm", batch_size=2, gradient_accumulation_steps=2, epochs=2,
                         eval_steps=3, save_steps=1, learning_rate=2e-2, lr_scheduler="cosine", warmup_steps=2,
                         progress_bar=False, tensorboard=False, device="cpu")
Trainer(model, args, train, sequences(8, seed=1), PackedCollator(0)).train(resume_from=resume)
