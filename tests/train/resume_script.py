"""Run by test_kill_resume.py in a subprocess: a small training run that can be SIGKILLed and resumed.

usage: python resume_script.py OUT_DIR SECONDS_PER_STEP [resume]
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TinyClassifier, classification_data  # noqa: E402

from peftkit.train import Trainer, TrainingArguments  # noqa: E402

torch.set_num_threads(1)
out, delay, resume = sys.argv[1], float(sys.argv[2]), len(sys.argv) > 3


class Slow(TinyClassifier):
    def forward(self, x, labels=None):
        time.sleep(delay)
        return super().forward(x, labels)


data = classification_data(48)
args = TrainingArguments(output_dir=out, task="classification", batch_size=4, gradient_accumulation_steps=2,
                         epochs=3, eval_steps=4, save_steps=1, learning_rate=1e-2, lr_scheduler="cosine",
                         warmup_steps=2, progress_bar=False, tensorboard=False, device="cpu")
Trainer(Slow(dropout=0.25), args, data[:40], data[40:]).train(resume_from=resume)
