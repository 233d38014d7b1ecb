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
