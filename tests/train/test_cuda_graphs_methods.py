"""cuda_graphs with every method of the contract suite, on a CUDA GPU: a graphed run trains as the
eager one does (same per-step losses, same trained tensors), or the Trainer refuses it up front."""
import pytest
import torch

from method_cases import CASES
from peftkit import get_peft_model
from peftkit.train import Trainer, TrainingArguments
from tiny_models import FAMILIES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def examples(n=32, length=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, length), generator=g)
    ids[:, 1::2] = ids[:, 0::2]
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def build(case):
    builder, targets, task = FAMILIES["llama"]
    base = builder(0)
    torch.manual_seed(1)
    return get_peft_model(base, case.config(targets, task))


def train(case, graphs: bool, tmp_path):
    model = build(case)
    args = TrainingArguments(progress_bar=False, tensorboard=False, device="cuda", task="causal-lm", precision="bf16",
                             learning_rate=5e-3, batch_size=4, max_steps=8, lr_scheduler="constant",
                             cuda_graphs=graphs, output_dir=str(tmp_path / str(graphs)))
    trainer = Trainer(model, args, examples())
    trainer.train()
    from peftkit.train.metrics import read_metrics

    losses = [r["loss"] for r in read_metrics(tmp_path / str(graphs) / "metrics.jsonl") if "loss" in r]
    trained = {k: v.detach().float().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}
    return trainer, losses, trained


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_graphed_training_matches_eager_or_is_refused(case, tmp_path):
    hooked = build(case).adapters_with_step_hooks()
    if hooked:
        with pytest.raises(ValueError, match="after-step hooks"):
            train(case, True, tmp_path)
        return
    _, eager_losses, eager = train(case, False, tmp_path)
    trainer, graph_losses, graphed = train(case, True, tmp_path)
    assert trainer.graphs.replays == 7
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5)
    for key, value in eager.items():
        torch.testing.assert_close(graphed[key], value, rtol=1e-4, atol=1e-6, msg=key)
