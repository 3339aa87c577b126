"""What ``peftkit sweep`` and ``peftkit compare`` share: several ``peftkit train`` jobs, one table.

Each job is an argv for ``peftkit train``; every one is parsed and checked before the first starts,
so a typo in the last one costs nothing. Jobs run one after another through ``train.run_job`` (the
same job building and trainer as ``peftkit train``), each into its own run folder under the batch
folder, and the table is rewritten after each run, so a killed batch keeps what it finished.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from peftkit.analysis import table

from . import train
from .errors import UserError

FORBIDDEN = ("--output-dir", "--resume")


@dataclass
class Planned:
    label: str
    argv: list[str]
    run_dir: Path
    extra: dict  # columns this batch adds (the swept value, the method options)


def check_shared(argv: list[str], command: str) -> None:
    for flag in FORBIDDEN:
        if flag in argv:
            raise UserError(f"{command} gives every run its own folder under its --output-dir; drop {flag} from the "
                            "options passed on to train")


def batch_dir(given: str | None, name: str) -> Path:
    path = Path(given) if given else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and any(path.iterdir()):
        raise UserError(f"output folder {str(path)!r} already exists and is not empty; choose a new --output-dir")
    return path


def folder_name(index: int, label: str) -> str:
    return f"{index:02d}-" + re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)


def parse_all(planned: list[Planned], hint: str = "") -> list:
    """train's RunConfig for every job, or a UserError naming the job that is wrong (and ``hint``)."""
    configs = []
    for job in planned:
        try:
            cfg, _ = train.parse([*job.argv, "--output-dir", str(job.run_dir)])
        except UserError as err:
            raise UserError(f"run {job.label!r}: {err}{hint}") from None
        configs.append(cfg)
    return configs


def run_all(planned: list[Planned], folder: Path, title: str, notes: dict, hint: str = "") -> list[dict]:
    configs = parse_all(planned, hint)
    rows: list[dict] = []
    for job, cfg in zip(planned, configs):
        train.report(f"=== {title}: run {len(rows) + 1}/{len(planned)}: {job.label}")
        summary = train.run_job(cfg, None)
        rows.append(table.row(job.label, summary, job.run_dir, job.extra))
        written = table.write(folder, rows, title, notes)
    train.report(f"results: {', '.join(str(p) for p in written)}")
    if len(written) < 3:
        train.report("matplotlib is not installed: wrote the tables without results.png")
    return rows
