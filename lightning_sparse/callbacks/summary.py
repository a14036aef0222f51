"""The model summary at the start of training, without columns that say nothing."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from typing_extensions import override

from lightning_sparse.core.console import echo

__all__ = ["ModelSummary"]


class ModelSummary(LightningModelSummary):
    """Lightning's model summary as a plain table, printed once, FLOPs only when measured.

    When it acts: ``on_fit_start``, on rank zero (as Lightning's). Lightning counts FLOPs only for a
    module with an ``example_input_array``; without one its summary shows a FLOPs column of zeros
    and ``Total FLOPs: 0``, which this one leaves out. The text goes through
    :func:`~lightning_sparse.core.console.echo`, so a run's log file holds it too.

    Args:
        max_depth: depth of nested layers listed (0: no summary), as Lightning's.

    Example::

        Trainer(callbacks=[ModelSummary(max_depth=1)], enable_model_summary=False)
    """

    def __init__(self, max_depth: int = 1, **summarize_kwargs: Any) -> None:
        super().__init__(max_depth=max_depth, **summarize_kwargs)

    def __repr__(self) -> str:
        return f"ModelSummary(max_depth={self._max_depth})"

    @staticmethod
    @override
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        echo(
            summary_text(
                summary_data,
                total_parameters,
                trainable_parameters,
                model_size,
                total_training_modes,
                total_flops,
            )
        )


def summary_text(
    summary_data: list[tuple[str, list[str]]],
    total_parameters: int,
    trainable_parameters: int,
    model_size: float,
    total_training_modes: dict[str, int],
    total_flops: int,
) -> str:
    """The summary as aligned text: one row per layer, then the totals."""
    columns = [(name, values) for name, values in summary_data if name != "FLOPs" or total_flops]
    header = [name.strip() for name, _ in columns]
    rows = [header]
    count = len(columns[0][1]) if columns else 0
    for index in range(count):
        rows.append([str(values[index]) for _, values in columns])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))

    def count_text(number: float) -> str:
        return str(get_human_readable_count(int(number))).strip()

    lines += [
        f"Trainable params: {count_text(trainable_parameters)}",
        f"Non-trainable params: {count_text(total_parameters - trainable_parameters)}",
        f"Total params: {count_text(total_parameters)}",
        f"Total estimated model params size (MB): {model_size:.3f}",
        f"Modules in train mode: {total_training_modes.get('train', 0)}; "
        f"in eval mode: {total_training_modes.get('eval', 0)}",
    ]
    if total_flops:
        lines.append(f"Total FLOPs: {count_text(total_flops)}")
    return "\n".join(lines)
