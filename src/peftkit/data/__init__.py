"""Data layer: read records, split them, tokenise them for classification or causal LM.

Records are plain dicts with canonical fields: ``text`` and ``label`` for classification,
``question`` and ``answer`` (or ``text``) for causal LM.
"""

from peftkit.data.assets import cache_dir, minilm_dir, qa_pairs, review_records, smollm2_dir
from peftkit.data.batching import IGNORE_INDEX, FeatureDataset
from peftkit.data.causal_lm import (
    CausalLMCollator,
    build_causal_lm_dataset,
    encode_qa,
    encode_text,
    prompt_batch,
    prompt_ids,
)
from peftkit.data.classification import (
    ClassificationCollator,
    build_classification_dataset,
    check_num_labels,
    label_mapping,
)
from peftkit.data.packing import PackedCollator, PackedDataset, check_packing_support, pack_dataset
from peftkit.data.readers import load_records, select_columns
from peftkit.data.split import train_eval_split

__all__ = [
    "IGNORE_INDEX",
    "CausalLMCollator",
    "ClassificationCollator",
    "FeatureDataset",
    "PackedCollator",
    "PackedDataset",
    "build_causal_lm_dataset",
    "build_classification_dataset",
    "check_packing_support",
    "cache_dir",
    "check_num_labels",
    "encode_qa",
    "encode_text",
    "label_mapping",
    "load_records",
    "minilm_dir",
    "pack_dataset",
    "prompt_batch",
    "prompt_ids",
    "qa_pairs",
    "review_records",
    "select_columns",
    "smollm2_dir",
    "train_eval_split",
]
