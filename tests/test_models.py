"""Tests for the model registry: every registered architecture, on CIFAR-like and MNIST-like inputs.

The parametrisation reads `model_names()` at collection time, so a newly registered model is
covered without touching this file.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models import BackdoorNet, build_model, get_head, is_heavy, model_names
from utils.errors import UserError

NUM_CLASSES = 10
#: (in_channels, image side): CIFAR-like and Fashion-MNIST-like inputs
GEOMETRIES = [(3, 32), (1, 28)]
#: the smallest batch that still trains BatchNorm; enough for shape and gradient checks and keeps
#: the large models (vgg19_bn has 139M parameters, swin_t 28M) fast on a CPU
BATCH = 2

_CACHE: dict[tuple[str, int, int], BackdoorNet] = {}


def _model(name: str, channels: int, size: int) -> BackdoorNet:
    """Build each (model, geometry) once per module; a test that changes a model restores it."""
    key = (name, channels, size)
    if key not in _CACHE:
        torch.manual_seed(0)
        _CACHE[key] = build_model(name, NUM_CLASSES, channels, size)
    return _CACHE[key]


def _input(name: str, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, channels, size, size, generator=gen)


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_free_models():
    # Batches of two images gain nothing from intra-op threads, and on a small shared CPU two
    # OpenMP threads stall each other (measured: 0.03 s vs 0.9 s per resnet18 forward when
    # another process is busy). The previous setting is restored for the other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    _CACHE.clear()


#: heavy models (`register_model(..., heavy=True)`: ResNet-50, DenseNet-161, VGG-19, Swin-T) get one
#: small side for both channel counts; a model that needs more pads it up (its min_input_size)
HEAVY_SIDE = 16


def _geometries(name: str) -> list[tuple[int, int]]:
    return [(c, HEAVY_SIDE) for c, _ in GEOMETRIES] if is_heavy(name) else GEOMETRIES


CASES = [pytest.param(name, c, s, id=f"{name}-{c}ch-{s}px") for name in model_names() for c, s in _geometries(name)]


def test_registry_is_not_empty_and_sorted():
    names = model_names()
    assert names, "no models registered"
    assert names == sorted(names)
    # the architectures the toolkit documents must be present
    for required in ("preactresnet18", "resnet18", "vgg19_bn", "resnet50", "densenet161"):
        assert required in names


@pytest.mark.parametrize("name,channels,size", CASES)
def test_forward_logits_and_features(name, channels, size):
    model = _model(name, channels, size)
    assert isinstance(model, BackdoorNet)
    head = get_head(model)
    assert isinstance(head, nn.Linear)
    assert head.out_features == NUM_CLASSES
    x = _input(name, channels, size)
    model.eval()
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
        recomposed = head(feats)
    assert logits.shape == (x.shape[0], NUM_CLASSES)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert feats.shape == (x.shape[0], head.in_features)
    assert torch.isfinite(feats).all()
    torch.testing.assert_close(recomposed, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,channels,size", CASES)
def test_last_stage_feature_maps_compose_to_the_features_and_logits(name, channels, size):
    """BTI-DBF masks and compares the last stage's feature maps: every model exposes them, and the
    penultimate features and logits are their pooled image."""
    model = _model(name, channels, size)
    x = _input(name, channels, size)
    model.eval()
    with torch.no_grad():
        maps = model.feature_maps(x)
        assert maps.dim() == 4 and maps.shape[0] == x.shape[0] and maps.shape[-1] >= 1
        torch.testing.assert_close(model.pool(maps), model.features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.logits_from_maps(maps), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,channels,size", CASES)
def test_backward_reaches_every_parameter(name, channels, size):
    model = _model(name, channels, size)
    model.train()
    model.zero_grad(set_to_none=True)
    x = _input(name, channels, size, seed=2)
    y = torch.arange(x.shape[0]) % NUM_CLASSES
    logits = model(x)
    assert logits.shape == (x.shape[0], NUM_CLASSES)
    # different inputs give different logits: the input reaches the output
    assert not torch.allclose(logits[0], logits[1])
    loss = nn.functional.cross_entropy(logits, y)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:10]}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:10]}"
    # the head must actually receive signal
    assert get_head(model).weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model.eval()


@pytest.mark.parametrize("name", model_names())
def test_get_head_unknown_path_is_user_error(name):
    model = _model(name, *_geometries(name)[0])
    with pytest.raises(UserError, match="nonexistent.layer"):
        get_head(model, "nonexistent.layer")


@pytest.mark.parametrize("name", model_names())
def test_get_head_on_non_linear_layer_is_user_error(name):
    model = _model(name, *_geometries(name)[0])
    path, module = next((n, m) for n, m in model.named_modules() if n and not isinstance(m, nn.Linear))
    with pytest.raises(UserError, match="not a Linear") as info:
        get_head(model, path)
    assert type(module).__name__ in str(info.value)


@pytest.mark.parametrize("name", model_names())
def test_get_head_by_explicit_name_is_the_default_head(name):
    model = _model(name, *_geometries(name)[0])
    assert get_head(model, model.head_name) is get_head(model)


def test_build_unknown_model_lists_names():
    with pytest.raises(UserError) as info:
        build_model("nope", NUM_CLASSES, 3, 32)
    msg = str(info.value)
    assert "nope" in msg
    for name in model_names():
        assert name in msg


def _check_new_head(name: str, model: BackdoorNet, old: nn.Linear, new: nn.Linear) -> None:
    assert get_head(model) is new
    assert get_head(model) is not old
    model.eval()
    x = _input(name, 1, 28, seed=3)
    with torch.no_grad():
        out = model(x)
        expected = new(model.features(x))
    assert out.shape == (x.shape[0], 7)
    torch.testing.assert_close(out, expected)
    # the old layer is gone from the module tree and the parameters
    assert all(m is not old for m in model.modules())
    assert all(p is not old.weight for p in model.parameters())


# --- PreActResNet-18 against BackdoorBench's -------------------------------------------------------

def _backdoorbench_preact18_shapes(num_classes: int) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry of BackdoorBench's PreActResNet18 (models/preact_resnet.py there) with
    its shape: a 3x3 stem `conv1`, stages `layer1`..`layer4` of two pre-activation blocks (`bn1`,
    `conv1`, `bn2`, `conv2`, and a 1x1 `shortcut.0` conv where the width or stride changes), then
    `linear`. No BatchNorm follows the last stage."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 3, 3)}

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    cin = 64
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for block in (0, 1):
            p = f"layer{stage}.{block}"
            bn(f"{p}.bn1", cin)
            shapes[f"{p}.conv1.weight"] = (width, cin, 3, 3)
            bn(f"{p}.bn2", width)
            shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
            if block == 0 and stage > 1:
                shapes[f"{p}.shortcut.0.weight"] = (width, cin, 1, 1)
            cin = width
    shapes["linear.weight"] = (num_classes, 512)
    shapes["linear.bias"] = (num_classes,)
    return shapes


def _official_preact18_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """BackdoorBench's PreActResNet18 forward in eval mode, written out with functional ops."""
    F = nn.functional

    def bn(prefix: str, t: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(t, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                            state[f"{prefix}.weight"], state[f"{prefix}.bias"], training=False)

    out = F.conv2d(x, state["conv1.weight"], padding=1)
    for stage in range(1, 5):
        for block in (0, 1):
            p = f"layer{stage}.{block}"
            stride = 2 if block == 0 and stage > 1 else 1
            pre = F.relu(bn(f"{p}.bn1", out))
            skip = F.conv2d(pre, state[f"{p}.shortcut.0.weight"], stride=stride) if stride == 2 else out
            body = F.conv2d(pre, state[f"{p}.conv1.weight"], stride=stride, padding=1)
            body = F.conv2d(F.relu(bn(f"{p}.bn2", body)), state[f"{p}.conv2.weight"], padding=1)
            out = body + skip
    pooled = out.mean(dim=(2, 3))
    return F.linear(pooled, state["linear.weight"], state["linear.bias"])


def test_preactresnet18_loads_backdoorbench_state_dict_strictly():
    shapes = _backdoorbench_preact18_shapes(NUM_CLASSES)
    assert len(shapes) == 102
    gen = torch.Generator().manual_seed(5)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[name] = torch.randn(shape, generator=gen) * 0.1
    model = build_model("preactresnet18", NUM_CLASSES, 3, 32)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    model.load_state_dict(state, strict=True)
    model.eval()
    x = _input("preactresnet18", 3, 32, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _official_preact18_forward(state, x), rtol=1e-4, atol=1e-5)
