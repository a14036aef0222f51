"""One-shot compression of a trained model: steps, plan, execution (a library)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from lightning_sparse.callbacks import ConstantPruning, progress_bar
from lightning_sparse.callbacks.base import MASKS, compression_callbacks, to_plain
from lightning_sparse.core.batch import batch_size
from lightning_sparse.core.criteria import (
    CRITERIA,
    criterion_masks,
    criterion_scores,
    needs_calibration,
)
from lightning_sparse.core.masks import check_compatible, parse_mask_type
from lightning_sparse.core.structure import applied_changes, structure_state
from lightning_sparse.core.targets import (
    ALL_PRUNABLE,
    output_weight_excluded,
    resolve_params,
    unknown_weights_note,
    weight_layouts,
)
from lightning_sparse.module import CHECKPOINT_IN_RUN_DIR
from lightning_sparse.posttrain.ptq import ptq_calibrate, ptq_check
from lightning_sparse.run import report
from lightning_sparse.run.recipe import (
    RecipeRecord,
    single_process,
)

__all__ = [
    "FINETUNE_CHECKPOINTS",
    "RECIPE_FILE",
    "OneShotPlan",
    "OneShotPruning",
    "OneShotQuantization",
    "OneShotRecord",
    "OneShotStep",
    "execute",
    "oneshot",
    "prepare",
]

log = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
# The fine-tune's own checkpoints (resumable, with optimizer state) go below the run's final one.
FINETUNE_CHECKPOINTS = Path("checkpoints") / "finetune"


class OneShotStep:
    """A post-training step: configured by its constructor, checked, then applied once.

    Subclasses implement :meth:`check` (before any work: raise ``ValueError`` naming the field)
    and :meth:`apply`; they state how many calibration batches they read and whether they run
    before the optional fine-tune (pruning) or after it (``after_finetune = True``: quantization).
    """

    after_finetune: ClassVar[bool] = False
    # What the model is after the step, for the report's rows ("pruned", "quantized").
    label: ClassVar[str] = "changed"

    @property
    def calibration_batches(self) -> int:
        """Calibration batches :meth:`apply` reads (0: none)."""
        return 0

    @property
    def target_names(self) -> list[str]:
        """Weights the step changes (as in ``module.named_parameters()``), known after check."""
        return []

    def check(self, module: nn.Module) -> None:
        """Raise ``ValueError`` if the step cannot apply to ``module``; must not change it."""

    def apply(self, module: nn.Module, calibration: Sequence[Any]) -> dict[str, Any]:
        """Change ``module`` in place; return what was done as JSON-ready data."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The constructor arguments, for summaries and checkpoints."""
        return {}


class OneShotPruning(OneShotStep):
    """Prune a trained model once to ``sparsity`` zeros, by magnitude or by Wanda's score.

    When it acts: once, in :meth:`apply` (called by :func:`oneshot` after the "before"
    evaluation). Scores are ``|W|`` (``magnitude``) or ``|W| * rms(input)`` (``wanda``, inputs
    gathered over ``calibration_batches`` batches of training data); the lowest-scored weights (or
    groups, for structured ``mask_type``) are set to zero, per layer or with one global threshold.

    Args:
        sparsity: fraction of zeros to reach, in [0, 1) (at most 1 - N/M for ``N:M``).
        criterion: ``magnitude`` or ``wanda``.
        params: parameter names, ``re:`` regexes or ``__ALL_PRUNABLE__`` (every Conv/Linear weight).
        mask_type: ``unstructured``, ``N:M`` (e.g. ``2:4``), ``blockB`` or ``channel`` (whole
            output channels; the model's last Conv/Linear layer, its head, is left out).
        global_sparsity: one threshold over all ``params`` instead of ``sparsity`` per layer.
        calibration_batches: training batches whose activations ``wanda`` reads (ignored by
            ``magnitude``).

    Raises:
        ValueError: an argument is out of range or unknown (the message names it); at ``check``:
            ``params`` match nothing or ``mask_type`` does not tile a target.

    Example::

        step = OneShotPruning(sparsity=0.7, criterion="wanda", calibration_batches=8)
        summary = oneshot(module, datamodule, [step], finetune_epochs=2)
    """

    label: ClassVar[str] = "pruned"

    def __init__(
        self,
        sparsity: float,
        criterion: str = "magnitude",
        params: str | Sequence[str] = ALL_PRUNABLE,
        mask_type: str = "unstructured",
        global_sparsity: bool = False,
        calibration_batches: int = 16,
    ) -> None:
        if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool):
            raise ValueError(f"`sparsity`={sparsity!r} is not allowed; it must be in [0, 1).")
        if not 0 <= sparsity < 1:
            raise ValueError(f"`sparsity`={sparsity!r} is not allowed; it must be in [0, 1).")
        if criterion not in CRITERIA:
            raise ValueError(f"`criterion`={criterion!r} is not allowed; choose one of {CRITERIA}.")
        parsed = parse_mask_type(mask_type)
        if sparsity > parsed.max_sparsity + 1e-9:
            raise ValueError(
                f"`sparsity`={sparsity} is more than `mask_type`={mask_type!r} can hold: at most "
                f"{parsed.max_sparsity:g} (1 - N/M)."
            )
        if not isinstance(calibration_batches, int) or isinstance(calibration_batches, bool):
            raise ValueError(
                f"`calibration_batches`={calibration_batches!r} is not allowed; give an integer."
            )
        if calibration_batches < (1 if needs_calibration(criterion) else 0):
            raise ValueError(
                f"`calibration_batches`={calibration_batches} is not allowed: `criterion`="
                f"{criterion!r} reads activations, so it needs at least 1 calibration batch."
            )
        plain = to_plain(params)
        plain = [plain] if isinstance(plain, str) else plain
        if not isinstance(plain, list) or not plain or not all(isinstance(p, str) for p in plain):
            raise ValueError(
                f"`params`={params!r} must be a parameter name, an `re:` pattern, "
                f"{ALL_PRUNABLE!r}, or a non-empty list of these."
            )
        self.sparsity = float(sparsity)
        self.criterion = criterion
        self.params: list[str] = plain
        self.mask_type = str(mask_type)
        self.global_sparsity = bool(global_sparsity)
        self._calibration_batches = int(calibration_batches)
        self._mask_type = parsed
        self._targets: list[str] = []

    @property
    @override
    def calibration_batches(self) -> int:
        return self._calibration_batches if needs_calibration(self.criterion) else 0

    @property
    @override
    def target_names(self) -> list[str]:
        return list(self._targets)

    def _resolve(self, module: nn.Module) -> dict[str, nn.Parameter]:
        # Whole output channels of the head are whole classes: channel masks leave it out.
        channel = self._mask_type.kind == "channel"
        return resolve_params(
            module, self.params, exclude=output_weight_excluded(module) if channel else None
        )

    @override
    def check(self, module: nn.Module) -> None:
        targets = self._resolve(module)
        layouts = weight_layouts(module, targets)
        for name, param in targets.items():
            check_compatible(name, param.shape, self._mask_type, layouts[name])
        self._targets = list(targets)

    @override
    def apply(self, module: nn.Module, calibration: Sequence[Any]) -> dict[str, Any]:
        targets = self._resolve(module)
        self._targets = list(targets)
        had = _zeros_fraction(targets.values())
        note = unknown_weights_note(module) if ALL_PRUNABLE in self.params else None
        if note:
            log.warning("OneShotPruning: %s", note)
        batches = calibration[: self.calibration_batches] if self.calibration_batches else None
        scores = criterion_scores(module, targets, self.criterion, batches)
        masks = criterion_masks(
            scores,
            self.sparsity,
            self._mask_type,
            self.global_sparsity,
            weight_layouts(module, targets),
        )
        with torch.no_grad():
            for name, param in targets.items():
                param.masked_fill_(~masks[name], 0.0)
        samples = sum(batch_size(batch) for batch in batches) if batches else 0
        return {
            **self.config(),
            "calibration_batches_used": len(batches) if batches else 0,
            "calibration_samples": samples,
            "pruned": {name: int((~mask).sum().item()) for name, mask in masks.items()},
            # Zeros over the targets before and after: a model sparser than `sparsity` already
            # stays so (pruning never regrows a weight), which the report then says.
            "sparsity_before": had,
            "sparsity_reached": _zeros_fraction(targets.values()),
        }

    @override
    def config(self) -> dict[str, Any]:
        return {
            "sparsity": self.sparsity,
            "criterion": self.criterion,
            "params": list(self.params),
            "mask_type": self.mask_type,
            "global_sparsity": self.global_sparsity,
            "calibration_batches": self._calibration_batches,
        }


class OneShotQuantization(OneShotStep):
    """Post-training quantization (PTQ): calibrate int8 scales on training batches, no training.

    When it acts: once, after the optional fine-tune (``after_finetune``), so the scales fit the
    final weights. Observers record each quantized layer's weight range and input range over
    ``calibration_batches`` batches; the model then computes with fake-quantized weights and
    inputs, exactly what the export writes to ``model_int8.onnx``. Pruned zeros stay zero
    (symmetric weights quantize 0 to 0).

    Args:
        calibration_batches: training batches to calibrate on (at least 1).
        num_bits: bits per weight, 8 or 4 (inputs are always 8-bit).
        symmetric: symmetric weights (zero point 0).
        per_channel: one weight scale per output channel.
        ignore: layers left in float: names, ``re:`` patterns or type names.
        exclude_first_last: leave the first and last Conv/Linear layers in float.

    Raises:
        ValueError: at construction, ``calibration_batches`` < 1; at ``check``, a bad option, an
            ``ignore`` entry that matches nothing, or a layer that is quantized already.

    Example::

        summary = oneshot(module, datamodule, [OneShotQuantization(calibration_batches=16)])
    """

    after_finetune: ClassVar[bool] = True
    label: ClassVar[str] = "quantized"

    def __init__(
        self,
        calibration_batches: int = 16,
        num_bits: int = 8,
        symmetric: bool = True,
        per_channel: bool = True,
        ignore: str | Sequence[str] = (),
        exclude_first_last: bool = False,
    ) -> None:
        if (
            not isinstance(calibration_batches, int)
            or isinstance(calibration_batches, bool)
            or calibration_batches < 1
        ):
            raise ValueError(
                f"`calibration_batches`={calibration_batches!r} is not allowed; post-training "
                "quantization needs an integer >= 1."
            )
        plain = to_plain(ignore)
        self._calibration_batches = calibration_batches
        self.options: dict[str, Any] = {
            "num_bits": num_bits,
            "symmetric": symmetric,
            "per_channel": per_channel,
            "ignore": [plain] if isinstance(plain, str) else list(plain),
            "exclude_first_last": exclude_first_last,
        }
        self.quantization_state: dict[str, Any] | None = None

    @property
    @override
    def calibration_batches(self) -> int:
        return self._calibration_batches

    @override
    def check(self, module: nn.Module) -> None:
        ptq_check(module, **self.options)

    @override
    def apply(self, module: nn.Module, calibration: Sequence[Any]) -> dict[str, Any]:
        batches = list(calibration[: self._calibration_batches])
        handle = ptq_calibrate(module, batches, **self.options)
        # The checkpoint carries the scales (the export finds them by their format tag).
        self.quantization_state = handle.state_dict()
        return {
            **self.config(),
            "calibration_batches_used": len(batches),
            "calibration_samples": sum(batch_size(batch) for batch in batches),
            "quantized_layers": sorted(handle.layers),
        }

    @override
    def config(self) -> dict[str, Any]:
        return {"calibration_batches": self._calibration_batches, **self.options}


def _zeros_fraction(weights: Any) -> float:
    tensors = list(weights)
    total = sum(t.numel() for t in tensors)
    zeros = sum(int((t.detach() == 0).sum().item()) for t in tensors)
    return zeros / total if total else 0.0


class OneShotRecord(Callback):
    """Stores what the one-shot steps did inside the checkpoints, as plain data.

    Args:
        recipe_name: the recipe's name (``conf/recipe/<name>.yaml``), if known.
        steps: ``{entry: step config}``.
    """

    def __init__(self, recipe_name: str | None, steps: Mapping[str, Any]) -> None:
        self.recipe_name = recipe_name
        self.steps = dict(steps)
        self.reports: dict[str, Any] = {}
        # Scales of a post-training quantization step, under the key the export looks for.
        self.quantization: dict[str, Any] | None = None
        # The model's structure changes (channels a step removed), replayed by whoever loads it.
        self.structure: list[dict[str, Any]] = []

    def __repr__(self) -> str:
        return f"OneShotRecord(recipe_name={self.recipe_name!r}, steps={list(self.steps)})"

    @property
    @override
    def state_key(self) -> str:
        return "oneshot"

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"name": self.recipe_name, "steps": self.steps, "reports": self.reports}
        if self.quantization is not None:
            state["quantization"] = self.quantization
        if self.structure:
            state["structure"] = structure_state(self.structure)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recipe_name = state_dict.get("name")
        self.steps = dict(state_dict.get("steps", {}))
        self.reports = dict(state_dict.get("reports", {}))


@dataclass
class OneShotPlan:
    """Everything :func:`execute` needs, validated by :func:`prepare`."""

    module: pl.LightningModule
    datamodule: pl.LightningDataModule
    steps: dict[str, OneShotStep]
    calibration: list[Any]
    finetune_epochs: int
    finetune_callbacks: list[Callback]
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def target_names(self) -> list[str]:
        """Weights the steps change, in step order, each once."""
        names: dict[str, None] = {}
        for step in self.steps.values():
            names.update(dict.fromkeys(step.target_names))
        return list(names)


def _named_steps(steps: Mapping[str, OneShotStep] | Sequence[OneShotStep]) -> dict[str, Any]:
    if isinstance(steps, Mapping):
        return dict(steps)
    named: dict[str, Any] = {}
    for step in steps:
        base = "pruning" if isinstance(step, OneShotPruning) else type(step).__name__.lower()
        name, index = base, 2
        while name in named:
            name, index = f"{base}_{index}", index + 1
        named[name] = step
    return named


def _check_single_process(trainer_kwargs: Mapping[str, Any]) -> None:
    devices = trainer_kwargs.get("devices", 1)
    strategy = trainer_kwargs.get("strategy", "auto")
    if not single_process(trainer_kwargs) or strategy not in ("auto", None):
        raise ValueError(
            f"One-shot compression runs in one process, but the trainer asks for devices="
            f"{devices!r}, strategy={strategy!r}: set trainer.devices=1 and leave out the "
            "strategy (trainer=cpu or trainer=gpu)."
        )


def _holders(callbacks: Sequence[Callback], module: nn.Module) -> set[str]:
    held: set[str] = set()
    for callback in compression_callbacks(callbacks):
        if MASKS in callback.changes:
            held.update(callback.resolve_targets(module))
    return held


def _calibration(datamodule: pl.LightningDataModule, count: int, where: str) -> list[Any]:
    if count == 0:
        return []
    datamodule.setup("fit")
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append(batch)
        if len(batches) >= count:
            break
    if not batches:
        raise ValueError(
            f"{where}: the calibration set is empty: the training data of "
            f"{type(datamodule).__name__} gave no batch. A data-aware criterion needs at least "
            "one; check the data (`data`) or use criterion=magnitude."
        )
    return batches


def prepare(
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    steps: Mapping[str, OneShotStep] | Sequence[OneShotStep],
    *,
    finetune_epochs: int = 0,
    finetune_callbacks: Sequence[Callback] | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> OneShotPlan:
    """Validate a one-shot job and read its calibration batches; change and write nothing.

    Args:
        module: the trained model (weights already loaded, e.g. with ``init_from``).
        datamodule: its data: calibration batches come from ``train_dataloader()``, evaluation
            from ``val_dataloader()`` and ``test_dataloader()``.
        steps: the one-shot steps, in order (a mapping names them; a list is named by kind).
        finetune_epochs: epochs of fine-tuning after the steps (0: none).
        finetune_callbacks: callbacks of the fine-tune; they must hold every pruned weight
            (``ConstantPruning`` or ``MagnitudePruning``). None: one ``ConstantPruning`` over the
            pruned weights.
        trainer_kwargs: ``Trainer`` arguments for evaluation and fine-tuning (one device).

    Raises:
        ValueError: a step is not a :class:`OneShotStep` or does not fit the model (the message
            names ``oneshot.<entry>`` and the field); the trainer is multi-process; the fine-tune
            would not hold some pruned weight; the model and the data disagree on the class
            count; the calibration set is empty.
    """
    named = _named_steps(steps)
    if not named:
        raise ValueError(
            "No one-shot steps were given; pass e.g. [OneShotPruning(0.7)] (with Hydra: "
            "recipe=oneshot_magnitude or recipe=oneshot_wanda)."
        )
    for name, step in named.items():
        if not isinstance(step, OneShotStep):
            raise ValueError(
                f"oneshot.{name}: {type(step).__name__} is not a OneShotStep (a one-shot step such "
                "as lightning_sparse.oneshot.OneShotPruning)."
            )
        try:
            step.check(module)
        except ValueError as err:
            raise ValueError(f"oneshot.{name}: {err}") from err
    if isinstance(finetune_epochs, bool) or int(finetune_epochs) != finetune_epochs:
        raise ValueError(f"`finetune_epochs`={finetune_epochs!r} is not allowed; give an integer.")
    if finetune_epochs < 0:
        raise ValueError(f"`finetune_epochs`={finetune_epochs} is not allowed; it must be >= 0.")
    kwargs = dict(trainer_kwargs or {})
    _check_single_process(kwargs)
    data_classes = getattr(datamodule, "num_classes", None)
    model_classes = getattr(module, "num_classes", None)
    comparable = isinstance(data_classes, int) and isinstance(model_classes, int)
    if comparable and data_classes != model_classes:
        raise ValueError(
            f"The model predicts {model_classes} classes (`model.num_classes`) but the data "
            f"have {data_classes} (`data.num_classes`); one-shot compression evaluates and "
            "calibrates on the data the model was trained for."
        )
    plan = OneShotPlan(
        module=module,
        datamodule=datamodule,
        steps=named,
        calibration=[],
        finetune_epochs=int(finetune_epochs),
        finetune_callbacks=[],
        trainer_kwargs=kwargs,
    )
    pruned = plan.target_names
    if finetune_callbacks is None:
        plan.finetune_callbacks = [ConstantPruning(params=pruned)] if pruned else []
    else:
        plan.finetune_callbacks = list(finetune_callbacks)
        if finetune_epochs > 0:
            loose = [n for n in pruned if n not in _holders(plan.finetune_callbacks, module)]
            if loose:
                raise ValueError(
                    f"`recipe`: the fine-tune would let {loose[0]!r} regrow its pruned weights "
                    f"({len(loose)} pruned weights unheld): no ConstantPruning (or "
                    "MagnitudePruning) of the fine-tune recipe selects it. Add one, e.g. "
                    "recipe.hold (compression/pruning/constant), with `params` covering it."
                )
    # Files first (a download that fails is an error before any work), then calibration batches.
    datamodule.prepare_data()
    needed = max((step.calibration_batches for step in named.values()), default=0)
    hungry = next((n for n, s in named.items() if s.calibration_batches == needed), "")
    plan.calibration = _calibration(datamodule, needed, f"oneshot.{hungry}")
    return plan


def _eval_trainer(kwargs: Mapping[str, Any], callbacks: Sequence[Callback] = ()) -> pl.Trainer:
    keep = ("accelerator", "devices", "precision", "deterministic", "limit_val_batches")
    options = {k: v for k, v in kwargs.items() if k in keep}
    if "limit_test_batches" in kwargs:
        options["limit_test_batches"] = kwargs["limit_test_batches"]
    options.update(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=list(callbacks),
    )
    return pl.Trainer(**options)


def _first(results: list[Mapping[str, Any]]) -> dict[str, float]:
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def _measure(plan: OneShotPlan, trainer: pl.Trainer, names: Sequence[str]) -> dict[str, Any]:
    """Validation and test metrics and the sparsity of ``names``, as the model is now."""
    datamodule = plan.datamodule
    val = (
        _first(trainer.validate(plan.module, datamodule=datamodule, verbose=False))
        if is_overridden("val_dataloader", datamodule)
        else {}
    )
    test = (
        _first(trainer.test(plan.module, datamodule=datamodule, verbose=False))
        if is_overridden("test_dataloader", datamodule)
        else {}
    )
    sparsity, _ = report.sparsity_stats(plan.module, names)
    return {
        "test_acc": test.get("test/acc"),
        "val_acc": val.get("val/acc"),
        "sparsity": sparsity,
        "metrics": {**val, **test},
    }


def _finetune(
    plan: OneShotPlan,
    output_dir: Path | None,
    loggers: list[Logger] | bool,
    records: Sequence[Callback],
) -> int:
    kwargs = dict(plan.trainer_kwargs)
    kwargs["max_epochs"] = plan.finetune_epochs
    kwargs.pop("max_steps", None)
    wanted = kwargs.pop("enable_progress_bar", None)
    show = True if wanted is None else bool(wanted)
    callbacks: list[Callback] = [*plan.finetune_callbacks, *records]
    if output_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=output_dir / FINETUNE_CHECKPOINTS, save_last=True))
    else:
        kwargs["enable_checkpointing"] = False
    if show:
        # A rich bar in a terminal, one line per epoch in a file or pipe (as `train`).
        callbacks.append(progress_bar())
    trainer = pl.Trainer(**kwargs, enable_progress_bar=show, callbacks=callbacks, logger=loggers)
    trainer.fit(plan.module, datamodule=plan.datamodule)
    return int(trainer.current_epoch)


def execute(
    plan: OneShotPlan,
    output_dir: str | Path | None = None,
    *,
    loggers: list[Logger] | bool = False,
    recipe_name: str | None = None,
    recipe: Mapping[str, Any] | None = None,
    seed: int = 0,
    source: str | None = None,
) -> dict[str, Any]:
    """Run a prepared one-shot job: evaluate, apply the steps, fine-tune, evaluate, write.

    Args:
        plan: from :func:`prepare`.
        output_dir: where ``checkpoints/last.ckpt`` (the final model, plain weights under their
            own names) and ``summary.json`` go; None writes nothing.
        loggers: loggers of the fine-tune.
        recipe_name: the recipe's name, for the summary.
        recipe: the recipe as data (``oneshot`` steps and fine-tune ``recipe``), for the summary.
        seed: the run's seed, for the summary.
        source: the checkpoint the model came from, for the summary.

    Returns:
        The summary: ``before``, ``after_oneshot``, ``after_finetune`` and
        ``after_quantization`` (None where there was no such stage) each with ``test_acc``,
        ``val_acc``, ``sparsity``, and the same as one row per stage under ``stages``; the final
        ``test_acc``, ``val_acc``, ``sparsity`` and ``sparsity_per_layer`` over the pruned
        weights (every prunable weight when no step prunes); the ``criterion``; one report per
        step under ``steps``; ``notes`` (e.g. a pruning step that ended above its target).
    """
    directory = Path(output_dir) if output_dir is not None else None
    configs = {name: step.config() for name, step in plan.steps.items()}
    record = OneShotRecord(recipe_name, configs)
    # As in `train`, checkpoints carry the recipe they were made with (here: the fine-tune's).
    records = [record, RecipeRecord(recipe_name, (recipe or {}).get("recipe") or {})]
    evaluator = _eval_trainer(plan.trainer_kwargs, records)
    # The weights the steps prune, else (post-training quantization alone) every prunable one:
    # an 80%-sparse model quantized is still 80% sparse, and the report says so.
    names = report.pruned_parameter_names(plan.module, plan.steps.values())
    before = _measure(plan, evaluator, names)
    stages = [{"stage": "trained", **before}]
    early = {n: s for n, s in plan.steps.items() if not s.after_finetune}
    for name, step in early.items():
        record.reports[name] = step.apply(plan.module, plan.calibration)
    names = report.pruned_parameter_names(plan.module, plan.steps.values())
    record.structure = applied_changes(plan.module)
    after = _measure(plan, evaluator, names)
    if early:
        stages.append({"stage": _stage_label(early), **after})
    finetuned = None
    epochs = 0
    if plan.finetune_epochs > 0:
        epochs = _finetune(plan, directory, loggers, records)
        finetuned = _measure(plan, evaluator, names)
        stages.append({"stage": "fine-tuned", **finetuned})
    late = {n: s for n, s in plan.steps.items() if s.after_finetune}
    quantized = None
    for name, step in late.items():
        record.reports[name] = step.apply(plan.module, plan.calibration)
        if isinstance(step, OneShotQuantization):
            record.quantization = step.quantization_state
    if late:
        quantized = _measure(plan, evaluator, names)
        stages.append({"stage": _stage_label(late), **quantized})
    final = quantized or finetuned or after
    notes = _sparsity_notes(plan.steps, record.reports)
    for note in notes:
        log.warning(note)

    checkpoint = None
    if directory is not None:
        checkpoint = directory / CHECKPOINT_IN_RUN_DIR
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        evaluator.save_checkpoint(checkpoint, weights_only=False)
    callbacks = [*plan.steps.values(), *plan.finetune_callbacks]
    summary = report.build_summary(
        plan.module,
        callbacks,
        test_acc=final["test_acc"],
        val_acc=final["val_acc"],
        seed=seed,
        epochs=epochs,
        recipe_name=recipe_name,
        recipe=dict(recipe) if recipe is not None else {"oneshot": configs},
        checkpoint=str(checkpoint) if checkpoint else None,
        run_dir=str(directory) if directory is not None else "",
    )
    criteria = [s.criterion for s in plan.steps.values() if isinstance(s, OneShotPruning)]
    summary.update(
        stage="oneshot",
        source_checkpoint=source,
        criterion=criteria[0] if len(criteria) == 1 else (criteria or None),
        finetune_epochs=plan.finetune_epochs,
        before=before,
        after_oneshot=after,
        after_finetune=finetuned,
        after_quantization=quantized,
        stages=stages,
        steps=record.reports,
        notes=notes,
    )
    return summary


def _stage_label(steps: Mapping[str, OneShotStep]) -> str:
    """A row's name: what the steps made of the model (``pruned``), and which entries did it."""
    labels = list(dict.fromkeys(step.label for step in steps.values()))
    return f"{' + '.join(labels)} ({', '.join(f'oneshot.{name}' for name in steps)})"


def _sparsity_notes(steps: Mapping[str, OneShotStep], reports: Mapping[str, Any]) -> list[str]:
    """A pruning step that ends above its target (the model was sparser already) says so."""
    notes = []
    for name, step in steps.items():
        reached = reports.get(name, {}).get("sparsity_reached")
        if not isinstance(step, OneShotPruning) or reached is None:
            continue
        if reached > step.sparsity + 0.005:
            had = reports[name].get("sparsity_before", 0.0)
            notes.append(
                f"oneshot.{name}: asked for {100 * step.sparsity:.2f}% zeros, the weights now hold "
                f"{100 * reached:.2f}%: they had {100 * had:.2f}% already, and pruning never "
                "regrows a weight."
            )
    return notes


def oneshot(
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    steps: Mapping[str, OneShotStep] | Sequence[OneShotStep],
    *,
    finetune_epochs: int = 0,
    finetune_callbacks: Sequence[Callback] | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    output_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Compress a trained model in one shot, from Python: :func:`prepare` then :func:`execute`.

    Args:
        module: the trained model, e.g. ``ClassificationModule(SmallCNN(), init_from=run_dir)``.
        datamodule: calibration (training split) and evaluation data.
        steps: e.g. ``[OneShotPruning(0.7, criterion="wanda")]``.
        finetune_epochs: epochs of fine-tuning after the steps, zeros held (0: none).
        finetune_callbacks: callbacks of the fine-tune; None holds the pruned weights with a
            ``ConstantPruning``.
        trainer_kwargs: ``Trainer`` arguments (one device); quiet CPU defaults when None.
        output_dir: where to write ``checkpoints/last.ckpt`` and ``summary.json``; None: nothing.

    Returns:
        The summary (see :func:`execute`).

    Raises:
        ValueError: see :func:`prepare`; raised before the model is changed or a file written.

    Example::

        module = ClassificationModule(SmallCNN(), init_from="runs/train/2026-01-01/12-00-00")
        summary = oneshot(module, DigitsDataModule(), [OneShotPruning(0.7, criterion="wanda")])
        print(summary["before"]["test_acc"], summary["after_oneshot"]["test_acc"])
    """
    kwargs: dict[str, Any] = dict(trainer_kwargs or {"accelerator": "cpu"})
    loggers = kwargs.pop("logger", False)
    kwargs.setdefault("enable_progress_bar", False)
    kwargs.setdefault("enable_model_summary", False)
    plan = prepare(
        module,
        datamodule,
        steps,
        finetune_epochs=finetune_epochs,
        finetune_callbacks=finetune_callbacks,
        trainer_kwargs=kwargs,
    )
    summary = execute(plan, output_dir, loggers=loggers)
    if output_dir is not None:
        report.write_summary(summary, output_dir)
    return summary
