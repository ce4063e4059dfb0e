"""The torchvision adapter (models/torchvision_net.py): ResNet-50, DenseNet-161, `tv:<name>` models
and a user's own torchvision-style module split into feature maps, pool and head exactly as their
own forward computes, `tv:` names checked before anything is built, and one `tv:` model through
the attack and ft.py end to end."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

import models
from conftest import REPO_ROOT, attack_argv
from models import build_model, get_head, stages
from models.torchvision_net import TorchvisionNet, torchvision_model_names
from utils.commands import finetune
from utils.compat import import_torchvision
from utils.errors import UserError
from utils.record.layout import RESULT_FILE

sys.path.insert(0, str(REPO_ROOT / "tests"))
from test_cli import assert_user_error, run_script, snapshot, assert_unchanged  # noqa: E402

#: name -> (head path, channels of the last-stage feature maps)
SPLITS = {
    "resnet50": ("net.fc", 2048),
    "densenet161": ("net.classifier", 2208),
    "tv:mobilenet_v3_small": ("net.classifier.3", 576),  # the head is the last Linear of the classifier
    "tv:regnet_x_400mf": ("net.fc", 400),
    "tv:convnext_tiny": ("net.classifier.2", 768),  # LayerNorm2d + Flatten between pool and head
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(SPLITS))
def test_the_split_recomposes_torchvisions_own_forward(name):
    head_name, channels = SPLITS[name]
    torch.manual_seed(0)
    model = build_model(name, 10, 3, 32).eval()
    assert model.head_name == head_name and get_head(model).out_features == 10
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        own = model.net(x)  # torchvision's forward, untouched
        maps = model.feature_maps(x)
        feats = model.features(x)
        found = stages(model, x)
        assert torch.equal(model(x), own)
        assert torch.equal(get_head(model)(feats), own)
        assert torch.equal(model.logits_from_maps(maps), own)
    assert maps.shape[:2] == (2, channels) and feats.shape == (2, get_head(model).in_features)
    assert len(found) == 3 and torch.equal(found[-1], maps)
    # the stages get deeper: each one's side at most the previous one's
    assert all(a.shape[-1] >= b.shape[-1] for a, b in zip(found, found[1:]))


def test_state_dict_is_torchvisions_and_densenet_pads_small_inputs():
    tv = import_torchvision()
    model = build_model("resnet50", 10)
    reference = tv.models.resnet50(weights=None, num_classes=10)
    assert list(model.state_dict()) == [f"net.{k}" for k in reference.state_dict()]
    model.net.load_state_dict(reference.state_dict())  # torchvision weights load as they are
    # DenseNet-161's three transitions need a side of 29; Fashion-MNIST's 28 is padded to it
    dense = build_model("densenet161", 10, 1, 28).eval()
    assert dense.min_input_size == 29
    with torch.no_grad():
        assert dense(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_heavy_flag_keeps_the_big_models_out_of_the_light_list():
    assert {"resnet50", "densenet161", "vgg19_bn", "swin_t"} <= {n for n in models.model_names() if models.is_heavy(n)}
    light = models.light_model_names()
    assert "resnet18" in light and not {"resnet50", "densenet161"} & set(light)
    assert models.is_heavy("tv:resnet18")


@pytest.mark.parametrize("name, fragment", [
    ("tv:resnet99", "tv:resnet99 is not a torchvision classification model"),
    ("tv:../x", "tv:../x is not a torchvision classification model"),
    ("tv:", "is not a torchvision classification model"),
    ("tv:fasterrcnn_resnet50_fpn", "not a torchvision classification model"),  # detection, not classification
    ("tv:vit_b_16", "cannot split this family"),
    ("tv:resnet18\n", "not a torchvision classification model"),
    ("resnet99", "unknown model resnet99"),
])
def test_bad_tv_names_are_one_line_errors_that_build_nothing(name, fragment, monkeypatch):
    tv = import_torchvision()
    built = []
    monkeypatch.setattr(tv.models, "get_model", lambda *a, **k: built.append(a))
    with pytest.raises(UserError) as info:
        build_model(name, 10)
    message = str(info.value)
    assert fragment in message and "\n" not in message
    assert not built and not models.is_model_name(name)
    assert models.name_check()(name) is not None


def test_every_listed_name_of_a_known_family_is_accepted():
    names = [n for n in torchvision_model_names() if models.is_model_name(f"tv:{n}")]
    assert "resnet18" in names and "densenet121" in names and "mobilenet_v3_small" in names
    assert "vit_b_16" not in names


# --- a user's own torchvision-style model -------------------------------------------------------------

class TinyTorchvisionStyle(nn.Module):
    """Children in forward order, an AdaptiveAvgPool2d, a Linear `fc`: what the adapter expects."""

    def __init__(self, num_classes: int = 10, scramble: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)
        self.scramble = scramble

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x * 2 if self.scramble else x)  # `scramble`: something the split cannot see


def test_a_users_model_wraps_and_works_with_every_accessor():
    torch.manual_seed(0)
    net = TinyTorchvisionStyle()
    model = TorchvisionNet.wrap(net)
    assert model.head_name == "net.fc" and model.min_input_size == 1
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
        assert torch.equal(model.logits_from_maps(model.feature_maps(x)), net(x))
        found = stages(model, x)
    assert [tuple(s.shape[1:]) for s in found] == [(8, 16, 16), (16, 8, 8), (16, 4, 4)]
    # trains like any registered model: every parameter gets a gradient
    model.train()
    nn.functional.cross_entropy(model(x), torch.arange(4)).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_model_the_split_does_not_reproduce_is_refused():
    with pytest.raises(UserError, match="does not reproduce its forward"):
        TorchvisionNet.wrap(TinyTorchvisionStyle(scramble=True))
    no_head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(UserError, match="cannot find the head"):
        TorchvisionNet(no_head)
    with pytest.raises(UserError, match="no Conv2d layer"):
        TorchvisionNet(nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.Linear(4, 2))).min_input_size
    # no global pooling: the "trunk" flattens, so there are no feature maps to expose
    flat = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    with pytest.raises(UserError, match=r"does not give \(N, C, h, w\) feature maps"):
        TorchvisionNet.wrap(flat, image_size=8)


# --- through the command line -------------------------------------------------------------------------

@pytest.mark.parametrize("model, fragment", [("tv:../x", "tv:../x is not a torchvision classification model")])
def test_ft_py_refuses_a_bad_tv_model_in_one_line(model, fragment, tiny_cifar10, tmp_path):
    before = snapshot(tmp_path)
    proc = run_script("fine_tune/ft.py", ["--record_root", tmp_path, "--dataset_path", tiny_cifar10, "--dataset",
                                          "cifar10", "--attack", "badnet", "--model", model, "--device", "cpu"])
    assert_user_error(proc, fragment)
    assert_unchanged(before, tmp_path)


def test_a_tv_model_attacks_and_purifies_end_to_end(tiny_cifar10, tmp_path):
    from utils.victim.train import run_attack

    folder = run_attack("badnet", attack_argv(tiny_cifar10, tmp_path, "--model", "tv:mobilenet_v3_small"))
    assert folder.name.endswith("archi_tv:mobilenet_v3_small")
    results = finetune.main(["--dataset", "cifar10", "--model", "tv:mobilenet_v3_small", "--attack", "badnet",
                             "--device", "cpu", "--progress", "false", "--dataset_path", str(tiny_cifar10),
                             "--record_root", str(tmp_path), "--ft_mode", "ft", "--epochs", "1",
                             "--split_ratio", "0.2", "--batch_size", "30"])
    assert set(results) == {"ft"}
    report = json.loads((folder / "defense" / "ft" / RESULT_FILE).read_text())
    assert report["ft_mode"] == "ft"


def test_a_wrapped_model_registers_and_builds_like_the_docs_say():
    """docs/extending.md's recipe: register a builder that wraps the user's model."""
    from models import registry

    name = "test-wrapped-tiny"

    @models.register_model(name, heavy=True)
    def tiny(num_classes: int, in_channels: int = 3, image_size: int = 32) -> TorchvisionNet:
        return TorchvisionNet.wrap(TinyTorchvisionStyle(num_classes), in_channels, image_size)

    try:
        model = build_model(name, 7, 3, 16)
        assert models.model_label(model) == name and models.is_heavy(name) and name not in models.light_model_names()
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)
        assert list(model.state_dict())[0] == "net.conv1.weight"
    finally:
        registry._REGISTRY.pop(name)
        registry._HEAVY.discard(name)
