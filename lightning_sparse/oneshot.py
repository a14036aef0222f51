"""One-shot (post-training) compression of a trained model: ``python -m lightning_sparse.oneshot``.

Flow of one run: load the trained checkpoint into the configured model (every key must match);
validate the one-shot steps, the optional fine-tune recipe and the calibration data (nothing is
computed or written before all of it passes, apart from Hydra's own ``.hydra/``); evaluate; apply
the steps in order (pruning by weight magnitude or by Wanda's data-aware score, using calibration
batches from the training data); evaluate; optionally fine-tune for ``finetune_epochs`` with the
recipe's callbacks (``ConstantPruning`` holding every zero); evaluate; write the model to
``checkpoints/last.ckpt`` (it loads into the plain model with ``strict=True``) and
``summary.json`` with the accuracy before and after, the sparsity and the criterion.

A step is a :class:`OneShotStep`: configured by its constructor, checked against the model before
any work, applied once. Steps run in the order of the recipe's ``oneshot:`` entries, before the
fine-tune; a step whose class sets ``after_finetune = True`` runs after it (where post-training
quantization will go, to calibrate the weights that are finally kept).

Examples::

    python -m lightning_sparse.oneshot ckpt_path=runs/train/2026-01-01/12-00-00
    python -m lightning_sparse.oneshot recipe=oneshot_wanda oneshot.pruning.sparsity=0.7 \\
        ckpt_path=runs/train/2026-01-01/12-00-00 finetune_epochs=3
    python -m lightning_sparse.oneshot -m recipe=oneshot_magnitude,oneshot_wanda \\
        oneshot.pruning.sparsity=0.5,0.7,0.9 ckpt_path=...

From Python::

    module = ClassificationModule(SmallCNN(), init_from="runs/train/...")
    summary = oneshot(module, DigitsDataModule(), [OneShotPruning(0.7, criterion="wanda")])
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn
from typing_extensions import override

from lightning_sparse import report
from lightning_sparse.callbacks import ConstantPruning, MagnitudePruning
from lightning_sparse.callbacks.base import to_plain
from lightning_sparse.callbacks.quantization import ptq_calibrate, ptq_check
from lightning_sparse.export import export_model
from lightning_sparse.masks import check_compatible, parse_mask_type
from lightning_sparse.module import CHECKPOINT_IN_RUN_DIR, checkpoint_path, load_weights
from lightning_sparse.pruning_criteria import (
    CRITERIA,
    criterion_masks,
    criterion_scores,
    needs_calibration,
)
from lightning_sparse.recipe import (
    RecipeError,
    RecipeRecord,
    check_against_model,
    check_target,
    config_dir,
    instantiate_recipe,
    recipe_to_dict,
    single_process,
)
from lightning_sparse.targets import ALL_PRUNABLE, resolve_params

__all__ = [
    "RECIPE_FILE",
    "OneShotPlan",
    "OneShotPruning",
    "OneShotRecord",
    "OneShotStep",
    "execute",
    "instantiate_steps",
    "main",
    "oneshot",
    "prepare",
    "run",
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
        mask_type: ``unstructured``, ``N:M`` (e.g. ``2:4``), ``blockB`` or ``channel``.
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

    @override
    def check(self, module: nn.Module) -> None:
        targets = resolve_params(module, self.params)
        for name, param in targets.items():
            check_compatible(name, param.shape, self._mask_type)
        self._targets = list(targets)

    @override
    def apply(self, module: nn.Module, calibration: Sequence[Any]) -> dict[str, Any]:
        targets = resolve_params(module, self.params)
        self._targets = list(targets)
        batches = calibration[: self.calibration_batches] if self.calibration_batches else None
        scores = criterion_scores(module, targets, self.criterion, batches)
        masks = criterion_masks(scores, self.sparsity, self._mask_type, self.global_sparsity)
        with torch.no_grad():
            for name, param in targets.items():
                param.masked_fill_(~masks[name], 0.0)
        samples = sum(_batch_size(batch) for batch in batches) if batches else 0
        return {
            **self.config(),
            "calibration_batches_used": len(batches) if batches else 0,
            "calibration_samples": samples,
            "pruned": {name: int((~mask).sum().item()) for name, mask in masks.items()},
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
            "calibration_samples": sum(_batch_size(batch) for batch in batches),
            "quantized_layers": sorted(handle.layers),
        }

    @override
    def config(self) -> dict[str, Any]:
        return {"calibration_batches": self._calibration_batches, **self.options}


def _batch_size(batch: Any) -> int:
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) else 1


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

    @property
    @override
    def state_key(self) -> str:
        return "oneshot"

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"name": self.recipe_name, "steps": self.steps, "reports": self.reports}
        if self.quantization is not None:
            state["quantization"] = self.quantization
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
    for callback in callbacks:
        if isinstance(callback, (ConstantPruning, MagnitudePruning)):
            held.update(resolve_params(module, callback.params))
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
    show = sys.stdout.isatty() if wanted is None else bool(wanted)
    callbacks: list[Callback] = [*plan.finetune_callbacks, *records]
    if output_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=output_dir / FINETUNE_CHECKPOINTS, save_last=True))
    else:
        kwargs["enable_checkpointing"] = False
    if show and sys.stdout.isatty():
        callbacks.append(RichProgressBar())
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
        The summary: ``before``, ``after_oneshot`` and ``after_finetune`` (None without a
        fine-tune) each with ``test_acc``, ``val_acc``, ``sparsity``; the final ``test_acc``,
        ``val_acc``, ``sparsity`` and ``sparsity_per_layer`` over the pruned weights; the
        ``criterion``; one report per step under ``steps``.
    """
    directory = Path(output_dir) if output_dir is not None else None
    configs = {name: step.config() for name, step in plan.steps.items()}
    record = OneShotRecord(recipe_name, configs)
    # As in `train`, checkpoints carry the recipe they were made with (here: the fine-tune's).
    records = [record, RecipeRecord(recipe_name, (recipe or {}).get("recipe") or {})]
    evaluator = _eval_trainer(plan.trainer_kwargs, records)
    names = plan.target_names
    before = _measure(plan, evaluator, names)
    for name, step in plan.steps.items():
        if not step.after_finetune:
            record.reports[name] = step.apply(plan.module, plan.calibration)
    names = plan.target_names
    after = _measure(plan, evaluator, names)
    finetuned = None
    epochs = 0
    if plan.finetune_epochs > 0:
        epochs = _finetune(plan, directory, loggers, records)
        finetuned = _measure(plan, evaluator, names)
    late = {n: s for n, s in plan.steps.items() if s.after_finetune}
    for name, step in late.items():
        record.reports[name] = step.apply(plan.module, plan.calibration)
        if isinstance(step, OneShotQuantization):
            record.quantization = step.quantization_state
    final = _measure(plan, evaluator, names) if late else (finetuned or after)

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
        steps=record.reports,
    )
    return summary


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


def instantiate_steps(nodes: Mapping[str, Any] | DictConfig | None) -> dict[str, OneShotStep]:
    """Build the ``oneshot:`` entries of a config, each checked against its target's signature.

    Raises:
        RecipeError: a node has no importable ``_target_``, an unknown or missing argument, a
            value its constructor rejects (the message names ``oneshot.<entry>``), or it does
            not build a :class:`OneShotStep`.
    """
    entries = recipe_to_dict(nodes)
    steps: dict[str, OneShotStep] = {}
    for name, node in entries.items():
        where = f"oneshot.{name}"
        check_target(node, where)
        try:
            step = instantiate(node, _convert_="all")
        except InstantiationException as err:
            cause = err.__cause__ if err.__cause__ is not None else err
            raise RecipeError(f"{where}: {cause}") from cause
        except (ValueError, TypeError) as err:
            raise RecipeError(f"{where}: {err}") from err
        if not isinstance(step, OneShotStep):
            raise RecipeError(
                f"{where}: `_target_`={node['_target_']!r} built a {type(step).__name__}, not a "
                "OneShotStep."
            )
        steps[name] = step
    return steps


def _run_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir"):
        return Path(str(cfg.output_dir))
    return Path(HydraConfig.get().runtime.output_dir)


def _recipe_name() -> str | None:
    if not HydraConfig.initialized():
        return None
    name = HydraConfig.get().runtime.choices.get("recipe")
    return str(name) if name is not None else None


def _loggers(cfg: DictConfig) -> list[Logger] | bool:
    nodes = cfg.get("logger") or {}
    loggers = [instantiate(node) for node in nodes.values() if node and "_target_" in node]
    return loggers or False


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one one-shot job from a composed config (``conf/oneshot.yaml``); return its summary.

    Everything is checked before any work or file of the run: the steps, the fine-tune recipe,
    the checkpoint (it must match the model key for key), the data, the calibration set.

    Raises:
        RecipeError: an invalid ``oneshot`` step or fine-tune ``recipe`` entry.
        FileNotFoundError: ``ckpt_path`` does not exist (or is a run dir without a checkpoint),
            or the data are missing.
        ValueError: the checkpoint does not match the model (the first mismatched key is
            named); see :func:`prepare` for the rest.
    """
    pl.seed_everything(int(cfg.seed), workers=True)
    trainer_kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    finetune_epochs = int(cfg.get("finetune_epochs") or 0)
    trainer_kwargs["max_epochs"] = finetune_epochs
    steps = instantiate_steps(cfg.get("oneshot"))
    if not steps:
        raise RecipeError(
            "oneshot: the recipe has no one-shot steps (no `oneshot:` entries); use "
            "recipe=oneshot_magnitude or recipe=oneshot_wanda."
        )
    finetune_recipe = recipe_to_dict(cfg.get("recipe"))
    finetune_callbacks = instantiate_recipe(finetune_recipe, trainer_kwargs)
    source = str(checkpoint_path(cfg.ckpt_path, field="ckpt_path"))

    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    module: pl.LightningModule = instantiate(cfg.model)
    # One-shot compresses the very model that was trained: no key, not even the head, may differ.
    load_weights(module, source, head=None, field="ckpt_path")
    check_against_model(finetune_callbacks, module)
    plan = prepare(
        module,
        datamodule,
        steps,
        finetune_epochs=finetune_epochs,
        finetune_callbacks=list(finetune_callbacks.values()),
        trainer_kwargs=trainer_kwargs,
    )

    run_dir = _run_dir(cfg)
    recipe_name = _recipe_name()
    recipe = {"oneshot": recipe_to_dict(cfg.get("oneshot")), "recipe": finetune_recipe}
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(recipe), run_dir / RECIPE_FILE)
    summary = execute(
        plan,
        run_dir,
        loggers=_loggers(cfg) if finetune_epochs > 0 else False,
        recipe_name=recipe_name,
        recipe=recipe,
        seed=int(cfg.seed),
        source=source,
    )
    if cfg.get("export", True):
        # ONNX fp32 (and int8 after PTQ) plus the compressed checkpoint, as `train` writes them.
        summary.update(export_model(plan.module, datamodule, run_dir / "export"))
    report.write_summary(summary, run_dir)
    report.print_summary(summary)
    Console().print(stages_table(summary))
    return summary


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def stages_table(summary: Mapping[str, Any]) -> Table:
    """Accuracy and sparsity before, right after the steps, and after the fine-tune."""
    table = Table(title=f"one-shot: {summary.get('criterion')}")
    for column in ("stage", "test accuracy", "val accuracy", "sparsity"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for label, key in (
        ("trained", "before"),
        ("one-shot", "after_oneshot"),
        ("fine-tuned", "after_finetune"),
    ):
        stage = summary.get(key)
        if stage:
            table.add_row(
                label,
                _percent(stage.get("test_acc")),
                _percent(stage.get("val_acc")),
                _percent(stage.get("sparsity")),
            )
    return table


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="oneshot")
def main(cfg: DictConfig) -> float | None:
    """Console entry point; returns the final test accuracy for sweepers."""
    return run(cfg)["test_acc"]


if __name__ == "__main__":
    # `python -m` runs this file as `__main__`, a second copy of the module; Hydra builds the steps
    # from `lightning_sparse.oneshot`, so run that copy's `main`, whose isinstance checks see the
    # same classes.
    from lightning_sparse.oneshot import main as _imported_main

    _imported_main()
