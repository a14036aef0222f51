"""Hugging Face ``transformers`` backbones built from a config: no download, random weights.

The one module of the package that imports ``transformers`` (the ``transformers`` extra:
``pip install 'lightning_sparse[transformers]'``), so its version checks live here. The model
returned is the Hugging Face model itself (``BertForTokenClassification``, ...), so inside a
``ClassificationModule`` its parameters read
``model.bert.encoder.layer.0.attention.self.query.weight`` and
``model.transformer.h.0.attn.c_attn.weight`` (GPT-2's ``Conv1D``, whose weight is laid out
``[in, out]``; :mod:`lightning_sparse.core.layers` knows it), and a folder written by
``save_pretrained`` loads into it through ``model.init_from=<folder>`` when the config describes
the same architecture.

Example::

    backbone = bert_tiny(num_classes=4, vocab_size=100)
    module = ClassificationModule(backbone, num_classes=4)
    logits = module({"input_ids": ids, "attention_mask": mask})  # [batch, seq, 4]
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

__all__ = ["TASKS", "bert_tiny", "gpt2_tiny", "transformers_version"]

# What the backbone predicts: a class per token, or one per sequence.
TASKS = ("token", "sequence")
_MIN_VERSION = (4, 40)


def _transformers() -> Any:
    try:
        module = importlib.import_module("transformers")
    except ImportError as err:
        raise ImportError(
            "model=bert_tiny / model=gpt2_tiny need Hugging Face transformers: "
            "pip install 'lightning_sparse[transformers]'."
        ) from err
    major, minor = (int(part) for part in module.__version__.split(".")[:2])
    if (major, minor) < _MIN_VERSION:
        raise ImportError(
            f"transformers {module.__version__} is too old; lightning_sparse needs "
            f">= {'.'.join(map(str, _MIN_VERSION))}."
        )
    return module


def transformers_version() -> str | None:
    """The installed version, or None when the extra is not installed."""
    try:
        return str(importlib.import_module("transformers").__version__)
    except ImportError:
        return None


def _check(task: str, sizes: dict[str, int]) -> None:
    if task not in TASKS:
        raise ValueError(f"`task`={task!r} is not allowed; choose one of {TASKS}.")
    for field, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{field}`={value!r} is not allowed; it must be an int >= 1.")
    if sizes["hidden_size"] % sizes["num_heads"]:
        raise ValueError(
            f"`hidden_size`={sizes['hidden_size']} is not divisible by "
            f"`num_heads`={sizes['num_heads']}."
        )


def bert_tiny(
    num_classes: int,
    vocab_size: int = 100,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 128,
    dropout: float = 0.1,
    task: str = "token",
) -> nn.Module:
    """A BERT encoder with a classification head, built from a config (random weights).

    Args:
        num_classes: labels the head predicts.
        vocab_size: token ids are ``0 .. vocab_size - 1``.
        hidden_size: width of the encoder.
        num_layers: encoder layers.
        num_heads: attention heads (dividing ``hidden_size``).
        intermediate_size: width of each feed-forward block.
        max_positions: the longest sequence.
        dropout: hidden and attention dropout.
        task: ``token`` (``BertForTokenClassification``) or ``sequence``
            (``BertForSequenceClassification``).

    Raises:
        ValueError: a size below 1, ``hidden_size`` not divisible by ``num_heads``, an unknown
            ``task``.
        ImportError: transformers is not installed (the ``transformers`` extra).
    """
    sizes = {
        "num_classes": num_classes,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "intermediate_size": intermediate_size,
        "max_positions": max_positions,
    }
    _check(task, sizes)
    hf = _transformers()
    config = hf.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=num_classes,
        pad_token_id=0,
    )
    cls = hf.BertForTokenClassification if task == "token" else hf.BertForSequenceClassification
    return cls(config)


def gpt2_tiny(
    num_classes: int,
    vocab_size: int = 100,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    max_positions: int = 128,
    dropout: float = 0.1,
    task: str = "token",
) -> nn.Module:
    """A GPT-2 decoder with a classification head, built from a config (random weights).

    Its projections are Hugging Face ``Conv1D`` layers (weights ``[in, out]``); the feed-forward
    block is ``4 * hidden_size`` wide, as in GPT-2. Token 0 is the padding id (GPT-2's sequence
    head reads the last non-padding token). Arguments and errors as :func:`bert_tiny`.
    """
    sizes = {
        "num_classes": num_classes,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "max_positions": max_positions,
    }
    _check(task, sizes)
    hf = _transformers()
    config = hf.GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=num_heads,
        n_positions=max_positions,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        num_labels=num_classes,
        # GPT-2's ids (50256) lie outside a small vocabulary.
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    cls = hf.GPT2ForTokenClassification if task == "token" else hf.GPT2ForSequenceClassification
    return cls(config)
