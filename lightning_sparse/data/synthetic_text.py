"""A learnable token classification task on random token sequences: the transformer workload.

Each token id ``1 .. vocab_size - 1`` belongs to one of ``num_classes`` groups (a fixed random
assignment). The label of position ``t`` is the sum of the groups of ``x_t`` and the ``context``
tokens before it, mod ``num_classes`` (positions before the start count as 0): with ``context=1``,
``(group(x_t) + group(x_{t-1})) mod num_classes``. A model must both learn the groups
(embeddings) and read the previous tokens (attention): a unigram model tops out near
``1 / num_classes`` on later positions. Only the current and earlier tokens matter, so a causal
model (GPT-2) can learn it as well as a bidirectional one (BERT); a larger ``context`` is harder.

Sequences have random lengths in ``[min_length, seq_length]``, padded with token 0; padding has
``attention_mask`` 0 and label ``-100`` (ignored by the loss and the accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from lightning_sparse.data.base import TensorDataModule

__all__ = ["PAD_ID", "SyntheticTextDataModule", "TokenDataset"]

PAD_ID = 0
IGNORE_INDEX = -100


class TokenDataset(Dataset):
    """``({"input_ids", "attention_mask"}, labels)`` samples from three equal-length tensors."""

    def __init__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> None:
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs = {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index]}
        return inputs, self.labels[index]


class SyntheticTextDataModule(TensorDataModule):
    """Random token sequences labelled per token from the token and its predecessor.

    The samples are a pure function of ``data_seed`` and the sizes; ``seed`` drives the training
    shuffle only. Batches are ``({"input_ids": [B, S], "attention_mask": [B, S]}, labels [B, S])``,
    all int64.

    Args:
        num_classes: label classes (groups of tokens).
        vocab_size: token ids ``0 .. vocab_size - 1``; 0 is padding.
        seq_length: the longest sequence (and the padded length).
        context: how many tokens before each position its label depends on (>= 0).
        min_length: the shortest sequence (None: ``seq_length // 2``; ``seq_length``: no padding).
        train_size: training sequences.
        val_size: validation sequences.
        test_size: test sequences.
        batch_size: sequences per batch (per process under DDP).
        data_seed: seed of the token groups and the samples.
        seed: seed of the training shuffle (the run's seed).
        num_workers: ``DataLoader`` worker processes.
        input_shape: ``[seq_length]`` or None; stated so that configs can interpolate it.

    Example::

        datamodule = SyntheticTextDataModule(num_classes=4, vocab_size=100, seq_length=16)
    """

    def __init__(
        self,
        num_classes: int = 4,
        vocab_size: int = 100,
        seq_length: int = 16,
        context: int = 1,
        min_length: int | None = None,
        train_size: int = 2048,
        val_size: int = 256,
        test_size: int = 256,
        batch_size: int = 32,
        data_seed: int = 0,
        seed: int = 0,
        num_workers: int = 0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        if input_shape is not None and [int(d) for d in input_shape] != [int(seq_length)]:
            raise ValueError(
                f"`input_shape`={list(input_shape)} is not allowed; a sample is `seq_length` "
                f"token ids: [{seq_length}]."
            )
        if int(num_classes) < 2:
            raise ValueError(f"`num_classes`={num_classes!r} is not allowed; it must be >= 2.")
        if int(vocab_size) <= int(num_classes):
            raise ValueError(
                f"`vocab_size`={vocab_size!r} is not allowed; it must exceed `num_classes`="
                f"{num_classes} (token 0 is padding, every class needs a token)."
            )
        if int(seq_length) < 2:
            raise ValueError(f"`seq_length`={seq_length!r} is not allowed; it must be >= 2.")
        if not 0 <= int(context) < int(seq_length):
            raise ValueError(
                f"`context`={context!r} is not allowed; it must be in 0..{int(seq_length) - 1}."
            )
        shortest = int(seq_length) // 2 if min_length is None else int(min_length)
        if not 1 <= shortest <= int(seq_length):
            raise ValueError(
                f"`min_length`={min_length!r} is not allowed; it must be in 1..{seq_length}."
            )
        for field, value in (("train_size", train_size), ("val_size", val_size)):
            if int(value) < 1:
                raise ValueError(f"`{field}`={value!r} is not allowed; it must be >= 1.")
        if int(test_size) < 1:
            raise ValueError(f"`test_size`={test_size!r} is not allowed; it must be >= 1.")
        super().__init__(int(num_classes), (int(seq_length),), batch_size, seed, num_workers)
        self.vocab_size = int(vocab_size)
        self.seq_length = int(seq_length)
        self.context = int(context)
        self.min_length = shortest
        self.train_size = int(train_size)
        self.val_size = int(val_size)
        self.test_size = int(test_size)
        self.data_seed = int(data_seed)

    def _build(self) -> tuple[Dataset, Dataset, Dataset]:
        # A private generator: building the data must not consume the global RNG.
        generator = torch.Generator().manual_seed(self.data_seed)
        groups = torch.randint(self.num_classes, (self.vocab_size,), generator=generator)
        # Every class gets at least one token, so every label occurs.
        groups[1 : self.num_classes + 1] = torch.arange(self.num_classes)

        def sample(size: int) -> TokenDataset:
            ids = torch.randint(1, self.vocab_size, (size, self.seq_length), generator=generator)
            lengths = torch.randint(
                self.min_length, self.seq_length + 1, (size, 1), generator=generator
            )
            mask = torch.arange(self.seq_length).unsqueeze(0) < lengths
            group = groups[ids]
            total = group.clone()
            for back in range(1, self.context + 1):
                total[:, back:] += group[:, :-back]
            labels = total % self.num_classes
            ids = ids.masked_fill(~mask, PAD_ID)
            labels = labels.masked_fill(~mask, IGNORE_INDEX)
            return TokenDataset(ids, mask.to(torch.int64), labels)

        return sample(self.train_size), sample(self.val_size), sample(self.test_size)
