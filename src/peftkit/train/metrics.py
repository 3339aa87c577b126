"""Task metrics, the JSON-lines log (plus TensorBoard when installed) and the loss/accuracy plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"


class EvalAccumulator:
    """Collects per-batch sums and counts and reduces them to the task's metrics.

    ``loss`` is averaged over items (examples for classification, label tokens for causal LM), so
    batch sizes do not bias it; ``perplexity = exp(loss)``; ``f1`` is macro-averaged over classes.
    Only sums are kept (loss x items, items, a label x prediction confusion count), so the shards of
    several ranks add up to exactly the counts of one process (``merge_counts``).
    """

    def __init__(self, task: str | None):
        self.task, self.loss_sum, self.items = task, 0.0, 0
        self.confusion: torch.Tensor | None = None  # (classes, classes): [label, prediction] counts

    def add(self, loss: torch.Tensor | None, items: int, logits: torch.Tensor | None, labels) -> None:
        if loss is not None:
            self.loss_sum += float(loss) * items
            self.items += items
        if self.task == "classification" and logits is not None and labels is not None:
            self._count(logits.argmax(-1).cpu().flatten(), labels.cpu().flatten(), logits.shape[-1])

    def _count(self, preds: torch.Tensor, labels: torch.Tensor, classes: int) -> None:
        k = max(classes, int(labels.max()) + 1 if labels.numel() else 0)
        counts = torch.bincount(labels * k + preds, minlength=k * k).view(k, k)  # (k, k)
        self.confusion = counts if self.confusion is None else _padded(self.confusion, k) + _padded(counts, k)

    def counts(self, classes: int) -> list[float]:
        """[loss_sum, items, *confusion (classes x classes, row-major)] for a cross-rank sum."""
        confusion = _padded(self.confusion, classes) if self.confusion is not None else torch.zeros(classes, classes)
        return [self.loss_sum, float(self.items), *confusion.flatten().tolist()]

    def merge_counts(self, counts: list[float], classes: int) -> None:
        """Replace this accumulator's sums by ``counts`` (``counts`` layout, summed over ranks)."""
        self.loss_sum, self.items = counts[0], int(counts[1])
        confusion = torch.tensor(counts[2:], dtype=torch.float64).round().long().view(classes, classes)
        self.confusion = confusion if classes and int(confusion.sum()) else None

    def result(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.items:
            out["loss"] = self.loss_sum / self.items
            if self.task == "causal-lm":
                out["perplexity"] = math.exp(min(out["loss"], 80.0))
        if self.confusion is not None:
            out.update(confusion_metrics(self.confusion))
        return out


def _padded(confusion: torch.Tensor, k: int) -> torch.Tensor:
    grow = k - confusion.shape[0]
    return torch.nn.functional.pad(confusion, (0, grow, 0, grow)) if grow > 0 else confusion


def classification_metrics(preds: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro F1 over the classes that occur in labels or predictions."""
    k = int(torch.cat([preds, labels]).max()) + 1
    return confusion_metrics(torch.bincount(labels * k + preds, minlength=k * k).view(k, k))


def confusion_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro F1 from [label, prediction] counts; classes never seen are left out."""
    total, correct = confusion.sum(), confusion.diagonal().sum()
    accuracy = (correct.float() / total.float()).item()  # float32, as (preds == labels).float().mean()
    scores = []
    for c in torch.nonzero(confusion.sum(0) + confusion.sum(1)).flatten().tolist():
        tp = int(confusion[c, c])
        fp = int(confusion[:, c].sum()) - tp
        fn = int(confusion[c].sum()) - tp
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": accuracy, "f1": sum(scores) / len(scores)}


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``; mirrors scalars to TensorBoard."""

    def __init__(self, folder: Path | None, tensorboard: bool = True):
        self.path = Path(folder) / METRICS_FILE if folder is not None else None
        self.records: list[dict] = []
        self.writer = _tensorboard_writer(folder) if folder is not None and tensorboard else None

    def truncate_after(self, step: int) -> None:
        """Drop records logged after ``step`` (by a run killed before its next checkpoint)."""
        if self.path is None or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self.records = kept

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record.get("step", 0))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional; any import failure just means "not installed"
        return None
    return SummaryWriter(log_dir=str(Path(folder) / "tensorboard"))


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl; a line cut short by a kill (or garbled) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def plot_curves(records: list[dict], path: Path) -> Path:
    """Train/eval loss (left) and eval accuracy or perplexity (right) against the step, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    loss_ax, score_ax = fig.subplots(1, 2)
    _series(loss_ax, records, "loss", "train loss")
    _series(loss_ax, records, "eval_loss", "eval loss", marker="o")
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    score = "eval_accuracy" if any("eval_accuracy" in r for r in records) else "eval_perplexity"
    _series(score_ax, records, score, score.removeprefix("eval_"), marker="o")
    score_ax.set(xlabel="step", ylabel=score.removeprefix("eval_"), title=f"held-out {score.removeprefix('eval_')}")
    for ax in (loss_ax, score_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path


def _series(ax, records: list[dict], key: str, label: str, marker: str | None = None) -> None:
    points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
    if points:
        steps, values = zip(*points)
        ax.plot(steps, values, label=label, marker=marker)
