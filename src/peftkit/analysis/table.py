"""Result tables of several training runs: CSV + JSON (each written atomically) and a plot.

The plot needs matplotlib (a dependency of peftkit, used for training curves too); without it the
tables are still written and ``write`` says the plot was skipped.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from peftkit.io.atomic import atomic_write_text, atomic_write_with

COLUMNS = ("label", "method", "metric", "before", "after", "trainable_params", "total_params",
           "train_seconds", "peak_memory_bytes", "steps", "run_dir")


def row(label: str, summary: dict, run_dir: Path, extra: dict | None = None) -> dict:
    """One table row from a run's summary.json contents."""
    found = {k: summary.get(k) for k in COLUMNS if k in summary}
    return {"label": label, **(extra or {}), **found, "run_dir": str(run_dir)}


def to_csv(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write(folder: Path, rows: list[dict], title: str, notes: dict | None = None) -> list[Path]:
    """results.csv, results.json and (with matplotlib) results.png in ``folder``; return what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "results.csv", to_csv(rows))
    atomic_write_text(folder / "results.json", json.dumps({"title": title, **(notes or {}), "runs": rows}, indent=2) + "\n")
    written = [folder / "results.csv", folder / "results.json"]
    if rows and plot(rows, title, folder / "results.png"):
        written.append(folder / "results.png")
    return written


def plot(rows: list[dict], title: str, path: Path) -> bool:
    """Metric after training, trainable parameters and train time per run; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [str(r["label"]) for r in rows]
    panels = [(f"held-out {rows[0].get('metric', 'metric')} after", "after"), ("trainable parameters", "trainable_params"),
              ("train seconds", "train_seconds")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (name, key) in zip(axes, panels):
        ax.bar(labels, [float(r.get(key) or 0) for r in rows], color="tab:blue")
        ax.set_title(name)
        ax.tick_params(axis="x", rotation=30)
    axes[1].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return True
