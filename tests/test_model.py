"""model: the DigitCNN TorchServe builds from model.py."""

from __future__ import annotations

import ast
import importlib.util
import io

import pytest
import torch
from torch import nn
from ts.utils.util import list_classes_from_module

from digitserve import evaluate, model
from digitserve.model import DigitCNN

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def net() -> DigitCNN:
    torch.manual_seed(0)
    return DigitCNN().eval()


def test_builds_without_arguments_and_returns_logits(net):
    with torch.inference_mode():
        logits = net(torch.randn(3, 3, 96, 96))
    assert logits.shape == (3, 10)
    assert logits.dtype == torch.float32
    # Logits, not probabilities: rows do not sum to one and values may be negative.
    assert not torch.allclose(logits.sum(1), torch.ones(3), atol=1e-3)


def test_no_softmax_inside(net):
    kinds = {type(module) for module in net.modules()}
    assert not kinds & {nn.Softmax, nn.LogSoftmax, nn.Softmax2d, nn.Softmin}
    assert isinstance(net.classifier[-1], nn.Linear) and net.classifier[-1].out_features == 10


def test_model_file_defines_exactly_one_class():
    tree = ast.parse(open(model.__file__, encoding="utf-8").read())
    classes = [node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    assert classes == ["DigitCNN"]


def test_torchserve_finds_exactly_one_class_in_the_model_file():
    """TorchServe loads model.py as a stand-alone module and needs exactly one class in it."""
    spec = importlib.util.spec_from_file_location("served_model", model.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert [cls.__name__ for cls in list_classes_from_module(module)] == ["DigitCNN"]


def test_state_dict_round_trip(net, tmp_path):
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    path = tmp_path / "weights.pt"
    path.write_bytes(buffer.getvalue())
    loaded = evaluate.load_model(path)
    assert not loaded.training
    inputs = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        assert torch.equal(loaded(inputs), net(inputs))
    fresh = DigitCNN().eval()
    with torch.inference_mode():
        assert not torch.equal(fresh(inputs), net(inputs))  # the load did change something


def test_trains_on_a_batch():
    trainable = DigitCNN().train()
    logits = trainable(torch.randn(4, 3, 96, 96))
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    assert trainable.classifier[-1].weight.grad is not None


def test_crop_schedule_gives_each_share_of_the_steps_its_side():
    from digitserve import train

    crops = ((80, 0.75), (96, 0.25))
    assert [train.crop_at(p, crops) for p in (0.0, 0.5, 0.7499, 0.75, 0.99)] == \
        [80, 80, 80, 96, 96]
    assert train.crop_at(0.3, ((96, 1.0),)) == 96
    grid = torch.arange(96 * 96, dtype=torch.float32).view(1, 1, 96, 96)
    assert torch.equal(train.center_crop(grid, 80), grid[..., 8:88, 8:88])
    assert torch.equal(train.center_crop(grid, 96), grid)
    # The model takes a 3×80×80 crop as well as its 3×96×96 input (global pooling before the head).
    assert DigitCNN()(torch.randn(2, 3, 80, 80)).shape == (2, 10)


def test_label_smoothing_floor_and_ceiling_match_torchs_loss():
    """``target_ceiling`` is what cross-entropy with label smoothing really allows."""
    from digitserve import train

    ceiling = train.target_ceiling(0.1)
    assert ceiling["true_class_probability"] == pytest.approx(0.91)
    assert ceiling["other_class_probability"] == pytest.approx(0.01)
    target = torch.full((1, 10), ceiling["other_class_probability"])
    target[0, 3] = ceiling["true_class_probability"]

    def loss(probabilities: torch.Tensor) -> float:
        return nn.functional.cross_entropy(probabilities.log(), torch.tensor([3]),
                                           label_smoothing=0.1).item()

    assert loss(target) == pytest.approx(ceiling["lowest_loss"], abs=1e-5)
    surer = torch.full((1, 10), 0.001)
    surer[0, 3] = 0.991
    assert loss(surer) > loss(target) + 0.1  # more confident than the target costs loss
    assert train.target_ceiling(0.0)["lowest_loss"] == 0.0


def test_the_shipped_lever_measurements_cover_every_lever_and_render():
    """notebook 01 shows ``training_levers.json``: every lever measured, the chosen setting run."""
    from digitserve import levers

    record = levers.load()
    assert {row["lever"] for row in record["step_costs"]} == set(levers.STEP_LEVERS)
    baseline = next(row for row in record["step_costs"] if row["lever"].startswith("baseline"))
    assert baseline["cpu_ratio"] == 1.0
    chosen = [run for run in record["full_runs"] if run.get("chosen")]
    assert len({run["seed"] for run in chosen}) >= 2, "the chosen setting needs several seeds"
    for run in chosen:  # measured with exactly what train.FULL trains now (how often the test
        # set is measured changes the time, not the model)
        assert levers.differences_from_full(run["settings"]) <= {
            "seed", "threads", "test_every_epoch"}
    for table in (levers.step_cost_table(record), levers.full_run_table(record),
                  levers.summary(record)):
        assert "|" in table.data or "**" in table.data


def test_the_goal_line_says_met_or_not_from_the_runs():
    from digitserve import levers

    def run(accuracy, wall, setting):
        return {"test_accuracy": accuracy, "wall_time_s": wall, "setting": setting,
                "load_average": [0.5, 1.0]}

    missed = levers.goal([run(0.9910, 290, "short"), run(0.9942, 420, "long")])[0]
    assert "was not met" in missed and "99.10 % (short)" in missed and "99.42 % (long)" in missed
    met = levers.goal([run(0.9941, 299, "right"), run(0.9950, 301, "slow")])[0]
    assert "**was met** by 1 of the 2 runs" in met and "right" in met and "slow" not in met
