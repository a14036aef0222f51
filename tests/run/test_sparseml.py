"""SparseML recipes: reading both styles, eval(), the mapping, every refusal, and training runs."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from torch import nn

from lightning_sparse.callbacks import (
    KnowledgeDistillation,
    MagnitudePruning,
    QuantizationAwareTraining,
)
from lightning_sparse.data.synthetic import SyntheticDataModule
from lightning_sparse.models import MLP
from lightning_sparse.module import ClassificationModule, parse_lr_phases
from lightning_sparse.recipe import check_against_model, instantiate_recipe
from lightning_sparse.run.sparseml import (
    SUPPORTED_MODIFIERS,
    RecipeImportError,
    convert,
    evaluate_expression,
    load_file,
)
from tests.helpers import quiet_trainer

RECIPES = Path(__file__).parent / "sparseml_recipes"
RESNET = RECIPES / "resnet50_pruned_quant.md"
BERT = RECIPES / "bert_prune90_distill.md"
STAGED = RECIPES / "staged_2of4.yaml"

GMP = "lightning_sparse.callbacks.MagnitudePruning"
CONSTANT = "lightning_sparse.callbacks.ConstantPruning"
QAT = "lightning_sparse.callbacks.QuantizationAwareTraining"
KD = "lightning_sparse.callbacks.KnowledgeDistillation"


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def gmp_recipe(tmp_path: Path, fields: str = "", variables: str = "") -> Path:
    """A one-modifier tag-style recipe; ``fields`` adds or replaces GMPruningModifier fields."""
    base = {
        "params": "__ALL_PRUNABLE__",
        "init_sparsity": "0.0",
        "final_sparsity": "0.8",
        "start_epoch": "1.0",
        "end_epoch": "4.0",
        "update_frequency": "1.0",
    }
    for line in textwrap.dedent(fields).strip().splitlines():
        key, _, value = line.partition(":")
        base[key.strip()] = value.strip()
    body = "\n".join(f"    {k}: {v}" for k, v in base.items())
    return write(
        tmp_path,
        f"{textwrap.dedent(variables)}\npruning_modifiers:\n  - !GMPruningModifier\n{body}\n",
    )


def pruning_node(**kwargs: Any) -> dict[str, Any]:
    node = {
        "_target_": GMP,
        "init_sparsity": 0.0,
        "final_sparsity": 0.8,
        "start_epoch": 1.0,
        "end_epoch": 4.0,
        "update_frequency": 1.0,
        "inter_func": "cubic",
        "params": ["__ALL_PRUNABLE__"],
        "global_sparsity": False,
        "mask_type": "unstructured",
        "leave_enabled": True,
    }
    node.update(kwargs)
    return node


# ------------------------------------------------------------------------------------------------
# The three published structures, mapped exactly
# ------------------------------------------------------------------------------------------------


def test_resnet50_prune_quant_card() -> None:
    def group(final: float, name: str, layers: list[str]) -> dict[str, Any]:
        return pruning_node(
            init_sparsity=0.05,
            final_sparsity=final,
            start_epoch=1.0,
            end_epoch=36.0,
            update_frequency=0.5,
            params=[f"model.sections.{layer}.weight" for layer in layers],
            mask_type="block4",
            name=name,
        )

    assert load_file(RESNET) == {
        "recipe": {
            "pruning": group(
                0.7, "pruning", ["0.0.identity.conv", "0.0.conv1", "0.0.conv3", "0.1.conv1"]
            ),
            "pruning_1": group(
                0.75,
                "pruning_1",
                ["0.0.conv2", "0.1.conv2", "0.1.conv3", "1.0.identity.conv", "1.0.conv1"],
            ),
            "pruning_2": group(
                0.8, "pruning_2", ["1.0.conv2", "1.0.conv3", "1.1.conv1", "1.1.conv2", "1.1.conv3"]
            ),
            "quantization": {
                "_target_": QAT,
                "start_epoch": 100.0,
                "freeze_bn_stats_epoch": 116.0,
                "disable_quantization_observer_epoch": 115.0,
                "num_bits": 8,
                # Everything outside `input` and `sections` (the classifier) stays in float.
                "ignore": [r"re:(?!(?:model\.input|model\.sections)(?:\.|$))"],
            },
        },
        "trainer": {"max_epochs": 135},
        "model": {
            "lr": 0.008,
            "lr_schedule": "cosine",
            "min_lr_ratio": 0.00001 / 0.008,
            "weight_decay": 0.00005,
        },
    }


def test_bert_prune90_card_with_hardness_below_one() -> None:
    # The card's hardness 1.0 is refused (test below); SparseML's 0.5 is our 1.0.
    patterns = [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ]
    assert load_file(BERT, variables={"distill_hardness": 0.5}) == {
        "recipe": {
            "pruning": pruning_node(
                final_sparsity=0.9,
                start_epoch=2.0,
                end_epoch=20.0,
                update_frequency=0.01,
                params=[rf"re:model\.(?:bert.encoder.layer.*.{p}.weight)" for p in patterns],
            ),
            "distillation": {
                "_target_": KD,
                "teacher": "self",
                "hardness": 1.0,
                "temperature": 2.0,
                "start_epoch": 0.0,
                "end_epoch": None,
            },
        },
        "trainer": {"max_epochs": 30},
        "model": {},
    }


def test_bert_prune90_card_as_published_is_refused_for_hardness_one() -> None:
    with pytest.raises(RecipeImportError) as info:
        load_file(BERT)
    message = str(info.value)
    assert "bert_prune90_distill.md" in message
    assert "distillation_modifiers[0] (DistillationModifier).hardness=1" in message
    assert "h / (1 - h)" in message
    assert "no equivalent" in message


def test_staged_2of4_runs_the_stages_in_sequence() -> None:
    # Stage 1 ends at epoch 10 (its EpochRangeModifier), so stage 2's epochs 0-5 are 10-15. Its
    # ConstantPruningModifier (from epoch 10) is left out: the 2:4 schedule keeps its zeros.
    assert load_file(STAGED) == {
        "recipe": {
            "pruning": pruning_node(
                final_sparsity=0.5,
                start_epoch=1.0,
                end_epoch=8.0,
                update_frequency=0.5,
                params=[r"re:model\.(?:fc\d+\.weight)"],
                mask_type="2:4",
            ),
            "quantization": {
                "_target_": QAT,
                "start_epoch": 10.0,
                "freeze_bn_stats_epoch": 14.0,
                "disable_quantization_observer_epoch": 14.0,
                "num_bits": 8,
                "ignore": [],
            },
        },
        "trainer": {"max_epochs": 15},
        "model": {"lr": 0.001},
    }


# ------------------------------------------------------------------------------------------------
# Mapped recipes pass our validation and train
# ------------------------------------------------------------------------------------------------


class _Shortcut(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1)
        self.conv3 = nn.Conv2d(mid, cout, 1)
        self.identity = _Shortcut(cin, cout) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        return torch.relu(out + (self.identity.conv(x) if self.identity is not None else x))


class _Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)


class _Head(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(32, num_classes)


class TinyResNet(nn.Module):
    """SparseML's ResNet-50 names (``input``, ``sections.<s>.<b>.conv1``, ``classifier.fc``)."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.input = _Stem()
        blocks = [[(8, 4, 16), (16, 4, 16)], [(16, 8, 32), (32, 8, 32)]]
        self.sections = nn.ModuleList(
            nn.ModuleList(_Bottleneck(*shape) for shape in section) for section in blocks
        )
        self.classifier = _Head(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.input.bn(self.input.conv(x)))
        for section in self.sections:
            for block in section:
                x = block(x)
        return self.classifier.fc(x.mean(dim=(2, 3)))


class _Dense(nn.Module):
    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.dense = nn.Linear(inputs, outputs)


class _SelfAttention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)


class _Attention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.self = _SelfAttention(width)
        self.output = _Dense(width, width)


class _Layer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attention = _Attention(width)
        self.intermediate = _Dense(width, 2 * width)
        self.output = _Dense(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.attention.self
        x = x + self.attention.output.dense(torch.tanh(s.query(x)) * s.value(x) + s.key(x))
        return x + self.output.dense(torch.relu(self.intermediate.dense(x)))


class _Encoder(nn.Module):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(width) for _ in range(layers))


class _Bert(nn.Module):
    def __init__(self, inputs: int, width: int, layers: int) -> None:
        super().__init__()
        self.embeddings = nn.Linear(inputs, width)
        self.encoder = _Encoder(width, layers)


class TinyBert(nn.Module):
    """Hugging Face BERT's encoder names (``bert.encoder.layer.<i>.attention.self.query``)."""

    def __init__(self, num_classes: int = 4, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.bert = _Bert(64, width, layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bert.embeddings(x.flatten(1))
        for layer in self.bert.encoder.layer:
            x = layer(x)
        return self.classifier(x)


def fit(fragment: dict[str, Any], backbone: nn.Module) -> tuple[ClassificationModule, dict]:
    """Validate the mapped recipe like train.py does, then train on 8x8 synthetic images."""
    torch.manual_seed(0)
    module = ClassificationModule(backbone, num_classes=4, **fragment["model"])
    callbacks = instantiate_recipe(fragment["recipe"], fragment["trainer"])
    check_against_model(callbacks, module)
    data = SyntheticDataModule(
        num_classes=4, input_shape=(1, 8, 8), train_size=128, val_size=32, test_size=32,
        batch_size=32,
    )  # fmt: skip
    trainer = quiet_trainer(
        max_epochs=fragment["trainer"]["max_epochs"],
        callbacks=list(callbacks.values()),
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    return module, callbacks


def zeros(module: nn.Module, name: str) -> float:
    return float((dict(module.named_parameters())[name] == 0).float().mean())


def test_resnet50_card_trains_to_its_block_sparsities() -> None:
    scaled = {
        "num_epochs": 6.0,
        "pruning_start_epoch": 1.0,
        "pruning_end_epoch": 3.0,
        "quantization_start_epoch": 4.0,
        "disable_quantization_observer_epoch": 5.0,
        "freeze_bn_stats_epoch": 5.0,
    }
    fragment = load_file(RESNET, variables=scaled)
    assert fragment["trainer"] == {"max_epochs": 6}
    module, callbacks = fit(fragment, TinyResNet())
    quantization = callbacks["quantization"]
    assert isinstance(quantization, QuantizationAwareTraining)
    # `submodules: [input, sections]`: every Conv there is quantized, the classifier is not.
    assert quantization.fake_quant_enabled
    assert quantization.bn_stats_frozen
    assert not quantization.observer_enabled
    convs = [n for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(quantization.layer_names) == sorted(convs)
    for entry, target in (("pruning", 0.7), ("pruning_1", 0.75), ("pruning_2", 0.8)):
        callback = callbacks[entry]
        assert isinstance(callback, MagnitudePruning)
        for name in callback.target_names:
            weight = dict(module.named_parameters())[name]
            blocks = weight.numel() // 4  # [1, 4] blocks: 4 input channels at one position
            assert abs(zeros(module, name) - target) <= 1 / blocks + 1e-6, name
            grouped = (weight.detach().permute(0, 2, 3, 1).reshape(-1, 4) == 0).sum(dim=1)
            assert set(grouped.tolist()) <= {0, 4}, f"{name} is not pruned in whole blocks"
    assert zeros(module, "model.classifier.fc.weight") == 0.0


def test_bert_card_trains_to_90_percent_with_distillation() -> None:
    scaled = {
        "num_epochs": 5,
        "pruning_start_epoch": 1,
        "pruning_end_epoch": 3,
        "update_frequency": 0.5,
        "distill_hardness": 0.5,
    }
    module, callbacks = fit(load_file(BERT, variables=scaled), TinyBert())
    assert isinstance(callbacks["distillation"], KnowledgeDistillation)
    pruning = callbacks["pruning"]
    assert isinstance(pruning, MagnitudePruning)
    assert len(pruning.target_names) == 12  # 6 weights in each of the 2 encoder layers
    for name in pruning.target_names:
        assert zeros(module, name) == pytest.approx(0.9, abs=1e-3), name
    assert zeros(module, "model.bert.embeddings.weight") == 0.0
    assert zeros(module, "model.classifier.weight") == 0.0


def test_staged_2of4_trains_to_2of4_then_quantizes() -> None:
    fragment = load_file(STAGED, variables={"pruning_epochs": 4.0, "quantization_epochs": 2.0})
    assert fragment["recipe"]["quantization"]["start_epoch"] == 4.0
    assert fragment["trainer"] == {"max_epochs": 6}
    module, callbacks = fit(fragment, MLP(input_dim=64, hidden=(32, 32), num_classes=4))
    quantization = callbacks["quantization"]
    assert isinstance(quantization, QuantizationAwareTraining)
    assert quantization.fake_quant_enabled
    assert not quantization.observer_enabled  # frozen for the stage's last epoch
    for name in ("model.fc1.weight", "model.fc2.weight", "model.fc3.weight"):
        weight = dict(module.named_parameters())[name].detach()
        assert zeros(module, name) == 0.5
        assert ((weight.reshape(-1, 4) != 0).sum(dim=1) <= 2).all(), name


# ------------------------------------------------------------------------------------------------
# Reading: styles, variables, eval()
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("num_epochs - 2", 8.0),
        ("-num_epochs + +3", -7.0),
        ("(num_epochs + 2) * 0.5", 6.0),
        ("num_epochs / 4", 2.5),
        ("num_epochs // 4", 2.0),
        ("num_epochs % 4", 2.0),
        ("2 ** 3", 8),
        ("abs(-num_epochs)", 10.0),
        ("min(num_epochs, 3, 4)", 3),
        ("max(1, num_epochs)", 10.0),
        ("round(7 / 2)", 4),
        ("round(0.123, 2)", 0.12),
        ("int(num_epochs * 0.925)", 9),
        ("float(3)", 3.0),
    ],
)
def test_eval_arithmetic(expression: str, expected: float) -> None:
    assert evaluate_expression(expression, {"num_epochs": 10.0}, "x") == expected


@pytest.mark.parametrize(
    ("expression", "what"),
    [
        ("__import__('os').system('true')", "the call `__import__('os').system('true')`"),
        ("open('/etc/passwd')", "the call `open('/etc/passwd')`"),
        ("num_epochs.real", "the attribute access `num_epochs.real`"),
        ("[1, 2][0]", "the subscript `[1, 2][0]`"),
        ("(lambda: 1)()", "the call `(lambda: 1)()`"),
        ("'a' * 3", "the str constant `'a'`"),
        ("num_epochs if num_epochs else 1", "the IfExp expression"),
        ("num_epochs < 3", "the Compare expression"),
        ("max(*[1, 2])", "the starred argument in `max(*[1, 2])`"),
        ("round(x=1)", "the call `round(x=1)`"),
    ],
)
def test_eval_refuses_python(expression: str, what: str) -> None:
    with pytest.raises(RecipeImportError, match="recipes are data") as info:
        evaluate_expression(expression, {"num_epochs": 10.0}, "mods[0] (X).end_epoch")
    assert str(info.value).startswith(f"mods[0] (X).end_epoch: eval({expression}) contains {what}")


def test_eval_refuses_python_in_a_recipe_naming_the_field(tmp_path: Path) -> None:
    path = gmp_recipe(tmp_path, 'end_epoch: eval(__import__("os").getpid())')
    with pytest.raises(RecipeImportError) as info:
        load_file(path)
    assert (
        "pruning_modifiers[0] (GMPruningModifier).end_epoch: "
        'eval(__import__("os").getpid()) contains the call' in str(info.value)
    )


def test_eval_syntax_error(tmp_path: Path) -> None:
    path = gmp_recipe(tmp_path, "end_epoch: eval(4 +)")
    with pytest.raises(RecipeImportError, match=r"end_epoch: eval\(4 \+\) is not an arithmetic"):
        load_file(path)


def test_eval_unknown_variable(tmp_path: Path) -> None:
    path = gmp_recipe(tmp_path, "end_epoch: eval(num_epoch - 1)", "num_epochs: 5.0")
    with pytest.raises(
        RecipeImportError,
        match=r"end_epoch: eval\(num_epoch - 1\) names 'num_epoch', which is not a numeric recipe "
        r"variable \(did you mean 'num_epochs'\?\); variables: num_epochs",
    ):
        load_file(path)


def test_eval_division_by_zero(tmp_path: Path) -> None:
    path = gmp_recipe(tmp_path, "end_epoch: eval(4 / zero)", "zero: 0")
    with pytest.raises(RecipeImportError, match=r"end_epoch: eval\(4 / zero\) divides by zero"):
        load_file(path)


def test_eval_huge_power_is_refused() -> None:
    with pytest.raises(RecipeImportError, match="exponents above 1024 are refused"):
        evaluate_expression("10 ** 10 ** 10", {}, "x")


def test_variables_refer_to_each_other_in_any_order(tmp_path: Path) -> None:
    path = gmp_recipe(
        tmp_path,
        """
        start_epoch: eval(pruning_start)
        end_epoch: eval(pruning_end)
        init_sparsity: init_sparsity
        final_sparsity: eval(target)
        update_frequency: 1e-1
        """,
        """
        pruning_end: eval(num_epochs - 1)
        pruning_start: eval(pruning_end / 4)
        num_epochs: 5
        init_sparsity: 0.05
        target: "8e-1"
        """,
    )
    node = load_file(path)["recipe"]["pruning"]
    assert (node["start_epoch"], node["end_epoch"]) == (1.0, 4.0)
    # A plain variable name, and numbers YAML 1.1 reads as strings (`1e-1`, quoted "8e-1").
    assert (node["init_sparsity"], node["final_sparsity"], node["update_frequency"]) == (
        0.05,
        0.8,
        0.1,
    )


def test_variables_in_a_cycle(tmp_path: Path) -> None:
    path = gmp_recipe(tmp_path, "end_epoch: eval(a)", "a: eval(b + 1)\nb: eval(a - 1)")
    with pytest.raises(RecipeImportError, match=r"variable `a`: eval\(b \+ 1\) names 'b'.*cycle"):
        load_file(path)


def test_variable_overrides_reach_anchored_uses(tmp_path: Path) -> None:
    path = gmp_recipe(
        tmp_path,
        "end_epoch: *end\nstart_epoch: eval(end - 2)",
        "end: &end 4.0",
    )
    node = load_file(path, variables={"end": 8})["recipe"]["pruning"]
    assert (node["start_epoch"], node["end_epoch"]) == (6.0, 8.0)


def test_variable_override_of_an_unknown_variable(tmp_path: Path) -> None:
    with pytest.raises(RecipeImportError, match=r"variables \['num_epoch'\] are not set"):
        load_file(gmp_recipe(tmp_path, "", "num_epochs: 5"), variables={"num_epoch": 3})


def test_markdown_card_without_front_matter(tmp_path: Path) -> None:
    path = write(tmp_path, "# A card\n\nNo recipe here.\n", "card.md")
    with pytest.raises(RecipeImportError, match=r"card\.md: a markdown recipe card must hold"):
        load_file(path)


def test_yaml_file_with_front_matter_markers(tmp_path: Path) -> None:
    text = gmp_recipe(tmp_path).read_text()
    path = write(tmp_path, f"---\n{text}---\n\nnotes\n", "fenced.yaml")
    assert load_file(path)["recipe"] == {"pruning": pruning_node()}


def test_no_modifiers(tmp_path: Path) -> None:
    with pytest.raises(RecipeImportError, match="found no modifiers"):
        load_file(write(tmp_path, "num_epochs: 3\n"))


def test_not_a_modifier_in_a_list(tmp_path: Path) -> None:
    path = write(tmp_path, "pruning_modifiers:\n  - 3\n")
    with pytest.raises(RecipeImportError, match=r"pruning_modifiers\[0\]: not a modifier"):
        load_file(path)


def test_sparseml_16_style_with_renamed_fields(tmp_path: Path) -> None:
    # SparseML 1.6+: `ModifierName: {fields}` mappings, `start`/`end`/`update`/`targets`/
    # `mask_structure`/`apply_globally`/`update_scheduler`, and stage variables under `args`
    # (which an override reaches too).
    path = write(
        tmp_path,
        """
        train_stage:
          args:
            end_epoch: 3.0
          pruning_modifiers:
            MagnitudePruningModifier:
              targets: ["re:.*fc1.weight"]
              init_sparsity: 0.0
              final_sparsity: 0.5
              start: 1.0
              end: eval(end_epoch)
              update: 0.5
              mask_structure: "0:0"
              apply_globally: true
              update_scheduler: linear
          other_modifiers:
            - ConstantPruningModifier:
                targets: model.fc3.weight
                start: 0.0
        """,
    )
    assert load_file(path, prefix="", variables={"end_epoch": 6}) == {
        "recipe": {
            "pruning": pruning_node(
                final_sparsity=0.5,
                end_epoch=6.0,
                update_frequency=0.5,
                inter_func="linear",
                params=["re:.*fc1.weight"],
                global_sparsity=True,
            ),
            "constant_pruning": {"_target_": CONSTANT, "params": ["model.fc3.weight"]},
        },
        "trainer": {},
        "model": {},
    }


def test_a_field_given_under_both_names(tmp_path: Path) -> None:
    path = gmp_recipe(tmp_path, "start: 1.0")
    with pytest.raises(RecipeImportError, match=r"gives 'start_epoch' twice \(as 'start' too\)"):
        load_file(path)


def test_a_later_stage_moves_and_an_earlier_to_the_end_stops_at_its_stage(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        """
        dense_stage:
          modifiers:
            - !EpochRangeModifier {start_epoch: 0.0, end_epoch: 2.5}
            - !DistillationModifier {start_epoch: -1, end_epoch: -1, hardness: 0.5}
        prune_stage:
          modifiers:
            - !EpochRangeModifier {start_epoch: 0.0, end_epoch: 4.0}
            - !GMPruningModifier
              {params: __ALL__, init_sparsity: 0.0, final_sparsity: 0.5, start_epoch: -1,
               end_epoch: 2.0, update_frequency: 1.0}
            - !DistillationModifier {start_epoch: 1.0, end_epoch: -1, hardness: 0.75}
        """,
    )
    fragment = load_file(path)
    # Stage 1 ends at ceil(2.5) = 3 (SparseML's max_epochs); its "to the end" ends there.
    assert fragment["recipe"]["distillation"]["end_epoch"] == 3.0
    assert fragment["recipe"]["pruning"]["start_epoch"] == 3.0
    assert fragment["recipe"]["pruning"]["end_epoch"] == 5.0
    assert fragment["recipe"]["distillation_1"]["start_epoch"] == 4.0
    assert fragment["recipe"]["distillation_1"]["end_epoch"] is None
    assert fragment["recipe"]["distillation_1"]["hardness"] == 3.0
    assert fragment["recipe"]["distillation_1"]["name"] == "distillation_1"
    assert fragment["trainer"] == {"max_epochs": 7}


# ------------------------------------------------------------------------------------------------
# The mapping
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sparseml", "ours"),
    [
        ("unstructured", "unstructured"),
        ("[1, 1]", "unstructured"),
        ("block", "block4"),
        ("block4", "block4"),
        ("[1, 4]", "block4"),
        ("[1, 8]", "block8"),
        ('"[1,4]"', "block4"),
        ('"2:4"', "2:4"),
        ('"1:8"', "1:8"),
        ("tensorrt", "2:4"),
        ("filter", "channel"),
    ],
)
def test_mask_types(tmp_path: Path, sparseml: str, ours: str) -> None:
    path = gmp_recipe(tmp_path, f"mask_type: {sparseml}")
    assert load_file(path)["recipe"]["pruning"]["mask_type"] == ours


@pytest.mark.parametrize(
    ("sparseml", "message"),
    [
        ("channel", "SparseML's 'channel' removes whole input channels; we prune whole output"),
        ("[4, 1]", "blocks across output channels are not"),
        ("uvp4a", "is not a mask type we can express; supported: 'unstructured'"),
    ],
)
def test_mask_types_we_cannot_express(tmp_path: Path, sparseml: str, message: str) -> None:
    path = gmp_recipe(tmp_path, f"mask_type: {sparseml}")
    with pytest.raises(RecipeImportError, match=r"\(GMPruningModifier\)\.mask_type=") as info:
        load_file(path)
    assert message in str(info.value)


def test_params_prefix_all_and_regex(tmp_path: Path) -> None:
    path = gmp_recipe(tmp_path, "params: [__ALL__, 're:^sections.*conv', classifier.fc.weight]")
    assert load_file(path)["recipe"]["pruning"]["params"] == [
        "__ALL_PRUNABLE__",
        r"re:model\.(?:sections.*conv)",
        "model.classifier.fc.weight",
    ]
    assert load_file(path, prefix="")["recipe"]["pruning"]["params"] == [
        "__ALL_PRUNABLE__",
        "re:^sections.*conv",
        "classifier.fc.weight",
    ]


def test_final_sparsity_mapping_becomes_one_entry_per_sparsity(tmp_path: Path) -> None:
    path = gmp_recipe(
        tmp_path, "params: []\nfinal_sparsity: {0.7: [fc1.weight], 0.9: ['re:fc[23].weight']}"
    )
    assert load_file(path)["recipe"] == {
        "pruning": pruning_node(final_sparsity=0.7, params=["model.fc1.weight"], name="pruning"),
        "pruning_1": pruning_node(
            final_sparsity=0.9, params=[r"re:model\.(?:fc[23].weight)"], name="pruning_1"
        ),
    }


def test_global_magnitude_pruning(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        gmp_recipe(tmp_path)
        .read_text()
        .replace("GMPruningModifier", "GlobalMagnitudePruningModifier"),
    )
    assert load_file(path)["recipe"]["pruning"]["global_sparsity"] is True


def test_pruning_that_never_ends(tmp_path: Path) -> None:
    with pytest.raises(RecipeImportError, match=r"end_epoch=-1: a pruning schedule that never"):
        load_file(gmp_recipe(tmp_path, "end_epoch: -1"))


def test_init_sparsity_from_param(tmp_path: Path) -> None:
    with pytest.raises(RecipeImportError, match="init_sparsity='__FROM_PARAM__': starting from"):
        load_file(gmp_recipe(tmp_path, "init_sparsity: __FROM_PARAM__"))


def test_missing_field(tmp_path: Path) -> None:
    path = write(tmp_path, "modifiers:\n  - !GMPruningModifier {params: __ALL__}\n")
    with pytest.raises(
        RecipeImportError, match="GMPruningModifier needs the field 'final_sparsity'"
    ):
        load_file(path)


def test_quantization_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        modifiers:
          - !QuantizationModifier
            start_epoch: -1
            ignore: [LayerNorm, Linear, classifier, "re:.*head"]
            exclude_module_types: [ReLU, Conv2d]
            weight_bits: 4
            model_fuse_fn_name: fuse_module
            quantize_embeddings: false
        """,
    )
    assert load_file(path)["recipe"]["quantization"] == {
        "_target_": QAT,
        "start_epoch": 0.0,
        "freeze_bn_stats_epoch": None,
        "disable_quantization_observer_epoch": None,
        "num_bits": 4,
        "ignore": ["Linear", "model.classifier", r"re:model\.(?:.*head)", "Conv2d"],
    }
    notes = convert(path)
    assert "LayerNorm is left out" in notes
    assert "model_fuse_fn_name='fuse_module'" in notes


def test_quantization_cannot_end(tmp_path: Path) -> None:
    path = write(tmp_path, "modifiers:\n  - !QuantizationModifier {start_epoch: 0, end_epoch: 3}\n")
    with pytest.raises(RecipeImportError, match=r"\.end_epoch=3.0: quantization cannot end"):
        load_file(path)


def test_quantization_reduce_range(tmp_path: Path) -> None:
    path = write(tmp_path, "modifiers:\n  - !QuantizationModifier {reduce_range: true}\n")
    with pytest.raises(RecipeImportError, match=r"\(QuantizationModifier\)\.reduce_range=True"):
        load_file(path)


def test_constant_pruning_from_a_later_epoch_without_a_schedule(tmp_path: Path) -> None:
    path = write(
        tmp_path, "modifiers:\n  - !ConstantPruningModifier {params: __ALL__, start_epoch: 2}\n"
    )
    with pytest.raises(
        RecipeImportError, match="holding zeros from a later epoch is not supported"
    ):
        load_file(path)


def test_cosine_learning_rate_over_the_run(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        modifiers:
          - !EpochRangeModifier {start_epoch: 0, end_epoch: 9.5}
          - !SetLearningRateModifier {start_epoch: 0, learning_rate: 0.1}
          - !LearningRateModifier
            start_epoch: -1
            lr_class: CosineAnnealingWarmRestarts
            lr_kwargs: {lr_min: 0.001, cycle_epochs: 10}
            init_lr: 0.1
        """,
    )
    assert load_file(path) == {
        "recipe": {},
        "trainer": {"max_epochs": 10},
        "model": {"lr": 0.1, "lr_schedule": "cosine", "min_lr_ratio": 0.001 / 0.1},
    }


def test_per_phase_learning_rates_become_lr_phases(tmp_path: Path) -> None:
    # As in the published ResNet-50 card: a cosine, a warm restart where pruning ends, and
    # MultiStepLR from the start of QAT (milestones are epochs of the recipe).
    path = write(
        tmp_path,
        """
        training_modifiers:
          - !EpochRangeModifier {start_epoch: 0.0, end_epoch: 135.0}
          - !LearningRateFunctionModifier
            {start_epoch: 0, end_epoch: 40, lr_func: cosine, init_lr: 0.008, final_lr: 0.0008}
          - !LearningRateFunctionModifier
            {start_epoch: 40, end_epoch: 100, lr_func: linear, init_lr: 0.004, final_lr: 0.0}
          - !LearningRateModifier
            start_epoch: 100
            lr_class: MultiStepLR
            lr_kwargs: {milestones: [107, 114, 125], gamma: 0.1}
            init_lr: 0.01
        """,
    )
    phases = load_file(path)["model"]["lr_phases"]
    assert phases == [
        {
            "start_epoch": 0.0,
            "lr": 0.008,
            "schedule": "cosine",
            "min_lr_ratio": 0.1,
            "end_epoch": 40,
        },
        {
            "start_epoch": 40,
            "lr": 0.004,
            "schedule": "linear",
            "min_lr_ratio": 0.0,
            "end_epoch": 100,
        },
        {"start_epoch": 100, "lr": 0.01},
        {"start_epoch": 107.0, "lr": pytest.approx(0.001)},
        {"start_epoch": 114.0, "lr": pytest.approx(0.0001)},
        {"start_epoch": 125.0, "lr": pytest.approx(0.00001)},
    ]
    parse_lr_phases(phases)  # what ClassificationModule accepts


def test_warm_restarts_and_step_schedules_become_phases(tmp_path: Path) -> None:
    approx = pytest.approx
    path = write(
        tmp_path,
        """
        modifiers:
          - !EpochRangeModifier {start_epoch: 0, end_epoch: 12}
          - !SetLearningRateModifier {start_epoch: 0, learning_rate: 0.1}
          - !LearningRateModifier
            start_epoch: 2
            lr_class: CosineAnnealingWarmRestarts
            lr_kwargs: {T_0: 2, T_mult: 2, eta_min: 0.01}
            init_lr: 0.05
            end_epoch: 8
          - !LearningRateModifier
            start_epoch: 8
            lr_class: StepLR
            lr_kwargs: {step_size: 2, gamma: 0.5}
            init_lr: 0.02
        """,
    )
    assert load_file(path)["model"]["lr_phases"] == [
        {"start_epoch": 0.0, "lr": 0.1},
        {
            "start_epoch": 2,
            "lr": 0.05,
            "schedule": "cosine",
            "min_lr_ratio": approx(0.2),
            "end_epoch": 4,
        },
        {
            "start_epoch": 4,
            "lr": 0.05,
            "schedule": "cosine",
            "min_lr_ratio": approx(0.2),
            "end_epoch": 8,
        },
        {"start_epoch": 8, "lr": 0.02},
        {"start_epoch": 10, "lr": 0.01},
    ]


def test_a_stage_moves_its_learning_rate_and_milestones(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        first_stage:
          first_modifiers:
            - !EpochRangeModifier {start_epoch: 0, end_epoch: 10}
            - !SetLearningRateModifier {start_epoch: 0, learning_rate: 0.1}
        second_stage:
          second_modifiers:
            - !EpochRangeModifier {start_epoch: 0, end_epoch: 5}
            - !LearningRateModifier
              start_epoch: 0
              lr_class: MultiStepLR
              lr_kwargs: {milestones: [3], gamma: 0.1}
              init_lr: 0.01
        """,
    )
    assert load_file(path)["model"]["lr_phases"] == [
        {"start_epoch": 0.0, "lr": 0.1},
        {"start_epoch": 10.0, "lr": 0.01},
        {"start_epoch": 13.0, "lr": pytest.approx(0.001)},
    ]


def test_learning_rate_set_mid_run_is_a_phase(tmp_path: Path) -> None:
    path = write(
        tmp_path, "modifiers:\n  - !SetLearningRateModifier {start_epoch: 5, learning_rate: 0.1}\n"
    )
    assert load_file(path)["model"] == {"lr_phases": [{"start_epoch": 5.0, "lr": 0.1}]}


@pytest.mark.parametrize(
    ("modifiers", "message"),
    [
        (
            "- !LearningRateFunctionModifier\n"
            "  {start_epoch: 0, end_epoch: 5, lr_func: linear, init_lr: 0.0, final_lr: 0.1}",
            r"lr_func='linear' from 0 to 0.1 cannot be expressed; a phase decays",
        ),
        (
            "- !LearningRateFunctionModifier\n"
            "  {start_epoch: 0, end_epoch: 5, lr_func: cyclic_linear, init_lr: 0.1, final_lr: 0}",
            r"lr_func='cyclic_linear' over epochs 0 to 5 cannot be expressed",
        ),
        (
            "- !LearningRateModifier {lr_class: ExponentialLR, lr_kwargs: {gamma: 0.9}, "
            "init_lr: 0.1}",
            r"lr_class='ExponentialLR' with lr_kwargs=\{'gamma': 0.9\} from epoch 0 cannot",
        ),
        (
            "- !LearningRateFunctionModifier\n"
            "  {start_epoch: 0, end_epoch: 6, lr_func: cosine, init_lr: 0.1, final_lr: 0}\n"
            "- !SetLearningRateModifier {start_epoch: 4, learning_rate: 0.1}",
            r"modifiers\[0\] \(LearningRateFunctionModifier\) sets the learning rate until "
            r"epoch 6, past modifiers\[1\] \(SetLearningRateModifier\)'s start at epoch 4",
        ),
        (
            "- !SetLearningRateModifier {start_epoch: 4, learning_rate: 0.1}\n"
            "- !SetLearningRateModifier {start_epoch: 4, learning_rate: 0.2}",
            r"sets the learning rate from epoch 4, as modifiers\[0\]",
        ),
    ],
)
def test_learning_rates_that_cannot_be_phases_are_refused(
    tmp_path: Path, modifiers: str, message: str
) -> None:
    text = "modifiers:\n" + textwrap.indent(modifiers, "  ") + "\n"
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeImportError, match=message):
        load_file(path)


def test_two_learning_rates_conflict(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        modifiers:
          - !SetLearningRateModifier {start_epoch: 0, learning_rate: 0.1}
          - !LearningRateFunctionModifier
            {start_epoch: 0, end_epoch: -1, lr_func: cosine, init_lr: 0.2, final_lr: 0.0}
        """,
    )
    with pytest.raises(
        RecipeImportError,
        match=r"modifiers\[1\] \(LearningRateFunctionModifier\) sets model.lr=0.2, but "
        r"modifiers\[0\] \(SetLearningRateModifier\) already set it to 0.1",
    ):
        load_file(path)


def test_weight_decay_mid_run_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path, "modifiers:\n  - !SetWeightDecayModifier {start_epoch: 40, weight_decay: 0}\n"
    )
    with pytest.raises(RecipeImportError, match="sets the weight decay at start_epoch=40"):
        load_file(path)


# ------------------------------------------------------------------------------------------------
# Unknown modifiers and fields
# ------------------------------------------------------------------------------------------------


def test_unknown_modifier_lists_the_supported_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "modifiers:\n  - !ACDCPruningModifier {compression_sparsity: 0.9}\n")
    with pytest.raises(RecipeImportError) as info:
        load_file(path)
    message = str(info.value)
    assert "modifiers[0] (ACDCPruningModifier): unknown modifier 'ACDCPruningModifier'" in message
    assert f"supported: {', '.join(SUPPORTED_MODIFIERS)}." in message


def test_unknown_modifier_suggests_a_close_one(tmp_path: Path) -> None:
    path = write(tmp_path, "modifiers:\n  - !GMPrunningModifier {}\n")
    with pytest.raises(RecipeImportError, match="did you mean 'GMPruningModifier'"):
        load_file(path)


def test_unknown_field_names_modifier_field_and_accepted(tmp_path: Path) -> None:
    path = gmp_recipe(tmp_path, "final_sparsty: 0.9")
    with pytest.raises(RecipeImportError) as info:
        load_file(path)
    message = str(info.value)
    assert (
        "pruning_modifiers[0] (GMPruningModifier): unknown field 'final_sparsty' "
        "(did you mean 'final_sparsity'?) for GMPruningModifier; accepted: init_sparsity, "
        "final_sparsity, start_epoch" in message
    )
    assert "mask_structure" in message  # the renamed spellings are accepted too


# ------------------------------------------------------------------------------------------------
# convert
# ------------------------------------------------------------------------------------------------


def test_convert_is_the_same_config_as_yaml() -> None:
    text = convert(RESNET)
    assert text.startswith("# @package _global_\n# Converted from the SparseML recipe ")
    assert yaml.safe_load(text) == load_file(RESNET)


def test_convert_notes_what_changed() -> None:
    text = convert(BERT, variables={"distill_hardness": 0.75})
    notes = text.replace("\n#   ", " ")
    assert "hardness=0.75 ((1-h)*task + h*distillation) is hardness=3" in notes
    assert "distill_output_keys=['start_logits', 'end_logits'] not used" in notes
    assert all(len(line) <= 100 for line in text.splitlines() if line.startswith("#"))


def test_converted_recipe_composes_as_a_hydra_recipe(tmp_path: Path) -> None:
    # As conf/train.yaml: the recipe comes after the trainer and model groups, so it overrides them.
    for group, text in (
        ("trainer/cpu.yaml", "max_epochs: 1\n"),
        ("model/mlp.yaml", "lr: 0.1\nlr_schedule: constant\n"),
        ("recipe/staged.yaml", convert(STAGED)),
    ):
        (tmp_path / group).parent.mkdir(exist_ok=True)
        (tmp_path / group).write_text(text)
    (tmp_path / "train.yaml").write_text(
        "defaults:\n  - trainer: cpu\n  - model: mlp\n  - recipe: staged\n  - _self_\n"
    )
    with initialize_config_dir(str(tmp_path), version_base="1.3"):
        cfg = compose("train")
    callbacks = instantiate_recipe(cfg.recipe, cfg.trainer)
    assert cfg.trainer.max_epochs == 15
    assert (cfg.model.lr, cfg.model.lr_schedule) == (0.001, "constant")
    assert isinstance(callbacks["pruning"], MagnitudePruning)
    assert callbacks["pruning"].mask_type == "2:4"
    assert math.isclose(callbacks["quantization"].start_epoch, 10.0)
