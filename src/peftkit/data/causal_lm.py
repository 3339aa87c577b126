"""Tokenised causal-LM datasets: chat Q/A pairs trained on the answer only, plain text on everything.

For a Q/A pair the model sees the chat-formatted conversation,
``[prompt: system? + user question + assistant header][completion: answer + end-of-turn]``, and the
labels are ``-100`` over the prompt, so the loss (and the gradient) comes only from the answer and
from the end-of-turn token that teaches the model to stop. Prompt and completion are tokenised
separately and concatenated: the prompt ids are then exactly the ids ``prompt_ids`` feeds to
``generate``, so training and generation agree on the boundary token by token.

Labels are aligned with ``input_ids`` (not shifted): the HF convention, where the model shifts them
by one inside its loss.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from peftkit.data.batching import (IGNORE_INDEX, FeatureDataset, attention_mask, check_multiple, pad_right,
                                   pad_token_id)


def _user(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def _chat_text(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat template, so Q/A pairs cannot be formatted; "
            "use an instruct model's tokenizer or set tokenizer.chat_template"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    """Token ids of already-formatted text: the template wrote the special tokens, so add none."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, question: str) -> list[int]:
    """Ids of the chat prompt up to and including the assistant header, ready for ``generate``."""
    return _ids(tokenizer, _chat_text(tokenizer, _user(question), add_generation_prompt=True))


def encode_qa(tokenizer, question: str, answer: str, *, max_length: int) -> dict:
    """One Q/A pair as ``input_ids`` and ``labels`` (``-100`` on the prompt), truncated to ``max_length``."""
    prompt_text = _chat_text(tokenizer, _user(question), add_generation_prompt=True)
    messages = _user(question) + [{"role": "assistant", "content": answer}]
    full_text = _chat_text(tokenizer, messages, add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "the chat template renders the conversation with a different prefix than the generation prompt, "
            "so the answer cannot be located; use a template where the prompt is a prefix of the full chat"
        )
    prompt = _ids(tokenizer, prompt_text)
    completion = _through_end_of_turn(_ids(tokenizer, full_text[len(prompt_text):]), tokenizer.eos_token_id)
    return _truncated(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, max_length)


def _through_end_of_turn(completion: list[int], eos_id: int | None) -> list[int]:
    """Cut what the template writes after the end-of-turn token (SmolLM2 adds a newline).

    That trailing text is template formatting, not something the model should learn to emit after
    it has already stopped.
    """
    if eos_id is None or eos_id not in completion:
        return completion
    last = len(completion) - 1 - completion[::-1].index(eos_id)
    return completion[: last + 1]


def encode_text(tokenizer, text: str, *, max_length: int) -> dict:
    """Plain text for language modelling: every token is a label, EOS appended so documents end."""
    ids = tokenizer(text)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return _truncated(ids, list(ids), max_length)


def _truncated(input_ids: list[int], labels: list[int], max_length: int) -> dict:
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def build_causal_lm_dataset(records: list[dict], tokenizer, *, max_length: int = 256) -> FeatureDataset:
    """Tokenise ``{"question", "answer"}`` and/or ``{"text"}`` records, unpadded.

    An example whose prompt alone fills ``max_length`` has no label left and would add nothing but a
    division by zero to the loss, so it is dropped with a warning.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    features = [_encode_record(tokenizer, r, i, max_length) for i, r in enumerate(records)]
    kept = [f for f in features if any(label != IGNORE_INDEX for label in f["labels"])]
    _report_dropped(len(features), len(kept), max_length)
    return FeatureDataset(kept)


def _encode_record(tokenizer, record: dict, index: int, max_length: int) -> dict:
    if "question" in record and "answer" in record:
        return encode_qa(tokenizer, str(record["question"]), str(record["answer"]), max_length=max_length)
    if "text" in record:
        return encode_text(tokenizer, str(record["text"]), max_length=max_length)
    raise ValueError(
        f"record {index} has fields {list(record)}; a causal-LM record needs 'question' and 'answer' "
        "(chat fine-tuning) or 'text' (plain language modelling); rename columns with select_columns"
    )


def _report_dropped(total: int, kept: int, max_length: int) -> None:
    if kept == 0:
        raise ValueError(f"all {total} examples lose every answer token at max_length={max_length}; raise max_length")
    if kept < total:
        warnings.warn(
            f"dropped {total - kept} of {total} examples whose prompt fills max_length={max_length}; "
            "raise max_length to keep them",
            stacklevel=3,
        )


@dataclass(frozen=True)
class CausalLMCollator:
    """Right-pads a batch: ``input_ids`` with the pad id, ``labels`` with -100, plus ``attention_mask``;
    to the longest example, rounded up to a multiple of ``pad_to_multiple_of``."""

    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __post_init__(self) -> None:
        check_multiple(self.pad_to_multiple_of)

    @classmethod
    def for_tokenizer(cls, tokenizer, pad_to_multiple_of: int = 1) -> CausalLMCollator:
        return cls(pad_token_id(tokenizer), pad_to_multiple_of)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids, multiple = [f["input_ids"] for f in features], self.pad_to_multiple_of
        return {
            "input_ids": pad_right(ids, self.pad_token_id, multiple),
            "attention_mask": attention_mask(ids, multiple),
            "labels": pad_right([f["labels"] for f in features], IGNORE_INDEX, multiple),
        }


def prompt_batch(tokenizer, questions: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded generation prompts for ``model.generate(**batch)``.

    Generation appends to the end of each row, so batched prompts must be padded on the left: with
    right padding the new tokens would follow pad tokens.
    """
    prompts = [prompt_ids(tokenizer, q) for q in questions]
    longest = max(len(p) for p in prompts)
    pad = pad_token_id(tokenizer)
    ids = [[pad] * (longest - len(p)) + p for p in prompts]
    mask = [[0] * (longest - len(p)) + [1] * len(p) for p in prompts]
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long)}
