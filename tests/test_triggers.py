"""Property tests for the triggers (utils.attacks.triggers), the poisoning (utils.attacks.poison) and the attack
registry (utils.attacks), on a few seeded random batches per case (docs/protocol.md §4)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from utils.attacks import triggers
from utils.analysis.results import attack_name
from utils.attacks.registry import ATTACKS, get_attack, make_trigger
from utils.data.datasets import DatasetInfo, dataset_info
from utils.victim.experiment import attack_options
from utils.errors import UserError
from utils.attacks.poison import (backdoor_labels, backdoor_test_set, choose_poison_indices, poison_count,
                                  poison_train_set)

CHANNELS = (1, 3)
SIZES = (28, 32, 64)
SEEDS = (0, 1, 2)


def _images(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)


def _side(size: int, patch: int = 3) -> int:
    """Expected trigger side: `patch` px at 32 px, scaled with the image, never below `patch`."""
    return max(patch, round(patch * size / 32))


# --- BadNet -------------------------------------------------------------------------------------

BADNET_CASES = list(itertools.product(triggers.BADNET_PATTERNS, CHANNELS, SIZES, SEEDS))


@pytest.mark.parametrize("kind,channels,size,seed", BADNET_CASES)
def test_badnet_changes_only_patch_pixels_where_pattern_is_set(kind, channels, size, seed):
    pattern, mask = triggers.badnet_trigger(kind, channels, size)
    assert pattern.shape == (channels, size, size) and pattern.dtype == torch.uint8
    assert mask.shape == (size, size) and mask.dtype == torch.bool
    x = _images(5, channels, size, seed)
    x_before = x.clone()
    out = triggers.apply_badnet(x, pattern, mask)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(x, x_before), "apply_badnet modified its input"

    side = _side(size)
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[size - side:, size - side:] = True
    set_px = pattern.amax(0) > 0
    assert torch.equal(mask, set_px), "mask must be exactly where the pattern is non-zero"
    assert not (mask & ~inside).any(), "trigger reaches outside the bottom-right patch"
    assert mask.any()

    changed = (out != x).any(dim=1).any(dim=0)  # (H, W): changed in any image / channel
    assert not (changed & ~mask).any(), "pixels outside the trigger changed"
    # where the trigger is set, the output is the pattern; elsewhere the input
    m = mask.expand_as(out)
    assert torch.equal(out[m], pattern.expand_as(out)[m])
    assert torch.equal(out[~m], x[~m])


@pytest.mark.parametrize("channels", CHANNELS)
def test_badnet_square_at_32px_covers_rows_and_cols_29_to_31(channels):
    pattern, mask = triggers.badnet_trigger("square", channels, 32)
    expected = torch.zeros(channels, 32, 32, dtype=torch.uint8)
    expected[:, 29:32, 29:32] = 255
    assert torch.equal(pattern, expected)
    assert torch.equal(mask, expected[0] > 0)
    out = triggers.apply_badnet(torch.zeros(2, channels, 32, 32, dtype=torch.uint8), pattern, mask)
    assert torch.equal(out, expected.expand(2, -1, -1, -1))


def _backdoorbench_grid_png(path) -> None:
    """BackdoorBench's grid trigger image (resource/badnet/generate_grid.py, default arguments):
    a black 32x32 RGB image whose bottom-right 3x3 block is a checkerboard of 255 (where row +
    column is even) and 1 (elsewhere)."""
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    for i in range(3):
        for j in range(3):
            img[29 + i, 29 + j, :] = 255 if (i + j) % 2 == 0 else 1
    Image.fromarray(img).save(path)


@pytest.mark.parametrize("seed", SEEDS)
def test_badnet_grid_matches_backdoorbench_pixel_for_pixel(tmp_path, seed):
    png = tmp_path / "trigger_image_grid.png"
    _backdoorbench_grid_png(png)
    # BackdoorBench reads the PNG (its 32 px resize is the identity at 32 px) and, per channel,
    # keeps the image where the trigger is 0 and takes the trigger's value where it is > 0.
    trig = np.asarray(Image.open(png).convert("RGB"), dtype=np.int64)  # (H, W, C)
    x = _images(4, 3, 32, seed)
    hwc = x.permute(0, 2, 3, 1).numpy().astype(np.int64)
    official = np.clip(hwc * (trig == 0) + trig * (trig > 0), 0, 255).astype(np.uint8)
    pattern, mask = triggers.badnet_trigger("grid", 3, 32)
    out = triggers.apply_badnet(x, pattern, mask)
    assert np.array_equal(out.permute(0, 2, 3, 1).numpy(), official)
    # all nine cells are pasted: the dark ones become exactly 1, never the original pixel
    assert int(mask.sum()) == 9 and bool(mask[29:, 29:].all())
    dark = torch.zeros(32, 32, dtype=torch.bool)
    dark[29:, 29:] = (torch.arange(3)[:, None] + torch.arange(3)[None, :]) % 2 == 1
    assert (out[..., dark] == 1).all() and (out[..., mask & ~dark] == 255).all()


@pytest.mark.parametrize("kind", triggers.BADNET_PATTERNS)
@pytest.mark.parametrize("channels", CHANNELS)
def test_badnet_scaled_to_64px_has_side_6_and_hard_edges(kind, channels):
    pattern, mask = triggers.badnet_trigger(kind, channels, 64)
    # only 0, the grid's dark 1 and 255: no interpolated (blurred) values
    assert set(pattern.unique().tolist()) <= {0, triggers.GRID_DARK, 255}
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    assert rows.min() >= 58 and cols.min() >= 58  # within the 6x6 bottom-right corner
    assert not pattern[:, :58, :].any() and not pattern[:, :, :58].any()
    block = pattern[0, 58:, 58:]
    # each 3x3 cell becomes a 2x2 block of one value
    expected_cells = torch.full((3, 3), 255, dtype=torch.uint8)
    if kind == "grid":
        ii, jj = torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")
        expected_cells = torch.where((ii + jj) % 2 == 0, 255, triggers.GRID_DARK).to(torch.uint8)
    assert torch.equal(block, expected_cells.repeat_interleave(2, 0).repeat_interleave(2, 1))
    # every channel carries the same pattern
    assert torch.equal(pattern, pattern[:1].expand_as(pattern))


def test_badnet_small_images_keep_the_three_pixel_side():
    pattern, mask = triggers.badnet_trigger("square", 1, 28)
    assert mask.sum() == 9 and mask[25:, 25:].all()


@pytest.mark.parametrize("kind,patch,size", [("star", 3, 32), ("square", 0, 32), ("square", 40, 32)])
def test_badnet_bad_arguments_are_user_errors(kind, patch, size):
    with pytest.raises(UserError):
        triggers.badnet_trigger(kind, 3, size, patch)


# --- Blended ------------------------------------------------------------------------------------

BLEND_CASES = list(itertools.product(CHANNELS, SIZES, (0.1, 0.2, 0.5, 0.93), SEEDS[:2]))


@pytest.mark.parametrize("channels,size,alpha,seed", BLEND_CASES)
def test_blend_matches_formula_and_stays_in_range(channels, size, alpha, seed):
    key = triggers.blend_key(channels, size)
    assert key.shape == (channels, size, size) and key.dtype == torch.uint8
    x = _images(4, channels, size, seed + 10)
    x_before = x.clone()
    out = triggers.apply_blend(x, key, alpha)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(x, x_before), "apply_blend modified its input"
    expected = np.rint((1 - alpha) * x.numpy().astype(np.float64) + alpha * key.numpy().astype(np.float64))
    diff = np.abs(out.numpy().astype(np.int64) - expected.astype(np.int64))
    assert diff.max() <= 1
    assert out.min() >= 0 and out.max() <= 255  # uint8, but also no wrap-around:
    lo = torch.minimum(x, key.expand_as(x))
    hi = torch.maximum(x, key.expand_as(x))
    assert (out >= lo).all() and (out <= hi).all(), "a convex mix leaves the [x, K] interval"


@pytest.mark.parametrize("channels", CHANNELS)
def test_blend_extremes(channels):
    key = triggers.blend_key(channels, 32)
    x = _images(3, channels, 32, 5)
    assert torch.equal(triggers.apply_blend(x, key, 0.0), x)
    assert torch.equal(triggers.apply_blend(x, key, 1.0), key.expand_as(x))
    white = torch.full_like(x, 255)
    assert torch.equal(triggers.apply_blend(white, torch.full_like(key, 255), 0.3), white)


def _roughness(key: torch.Tensor) -> float:
    """Mean absolute difference between horizontally and vertically adjacent pixels."""
    k = key.float()
    return float(((k[..., 1:, :] - k[..., :-1, :]).abs().mean() + (k[..., :, 1:] - k[..., :, :-1]).abs().mean()) / 2)


@pytest.mark.parametrize("channels, size", [(3, 32), (1, 28), (3, 64)])
def test_blend_default_key_is_a_smooth_picture_not_noise(channels, size):
    """The default key stands in for the paper's natural image: deterministic, varied (not flat),
    smooth (neighbouring pixels differ by a few levels; uniform noise differs by ~85)."""
    key = triggers.blend_key(channels, size)
    assert key.shape == (channels, size, size) and key.dtype == torch.uint8
    assert torch.equal(key, triggers.blend_key(channels, size))
    assert torch.equal(key, triggers.landscape_key(channels, size))
    assert key.float().std() > 25
    assert _roughness(key) < 12 * 32 / size
    assert _roughness(triggers.blend_key(channels, size, kind="noise")) > 60


def test_blend_key_is_the_same_picture_at_every_size():
    small = triggers.landscape_key(3, 32).float()
    large = torch.nn.functional.avg_pool2d(triggers.landscape_key(3, 128).float()[None], 4)[0]
    assert (small - large).abs().mean() < 2.0


def test_blend_noise_key_is_seeded_noise():
    a = triggers.blend_key(3, 32, kind="noise")
    assert torch.equal(a, triggers.blend_key(3, 32, kind="noise"))
    assert torch.equal(triggers.blend_key(3, 32, kind="noise", seed=7), triggers.blend_key(3, 32, kind="noise", seed=7))
    assert not torch.equal(triggers.blend_key(3, 32, kind="noise", seed=7), a)
    assert a.float().std() > 50
    with pytest.raises(UserError, match="blend_key"):
        triggers.blend_key(3, 32, kind="kitty")


@pytest.mark.parametrize("channels", CHANNELS)
def test_blend_key_from_image_file(tmp_path, channels):
    rgb = np.zeros((10, 10, 3), dtype=np.uint8)
    rgb[:, :, 0] = 200  # a red image
    path = tmp_path / "key.png"
    Image.fromarray(rgb).save(path)
    key = triggers.blend_key(channels, 16, str(path))
    assert key.shape == (channels, 16, 16) and key.dtype == torch.uint8
    if channels == 3:
        assert (key[0] == 200).all() and (key[1:] == 0).all()
    else:
        assert (key == round(200 * 299 / 1000)).all()  # PIL's luma of pure red


def test_blend_key_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot be read"):
        triggers.blend_key(3, 32, str(tmp_path / "does-not-exist.png"))


def test_blend_key_bad_image_file_is_user_error(tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is not a PNG file\n" * 4)
    with pytest.raises(UserError, match="not-an-image.png"):
        triggers.blend_key(3, 32, str(bad))


# --- poisoned indices ---------------------------------------------------------------------------

def _labels(n: int = 200, classes: int = 10, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (n,), generator=gen)


@pytest.mark.parametrize("pratio", [0.0, 0.005, 0.1, 0.37, 1.0])
@pytest.mark.parametrize("n", [1, 199, 200])
def test_choose_poison_indices_count_unique_sorted(pratio, n):
    labels = _labels(n)
    idx = choose_poison_indices(labels, pratio, seed=3, target=0)
    assert idx.dtype == torch.int64
    assert len(idx) == round(pratio * n) == poison_count(pratio, n)
    assert len(idx.unique()) == len(idx)
    assert torch.equal(idx, idx.sort().values)
    if len(idx):
        assert idx.min() >= 0 and idx.max() < n


def test_choose_poison_indices_reproducible_per_seed():
    labels = _labels(500)
    a = choose_poison_indices(labels, 0.1, seed=11, target=2)
    b = choose_poison_indices(labels, 0.1, seed=11, target=2)
    c = choose_poison_indices(labels, 0.1, seed=12, target=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_choose_poison_indices_dirty_label_draws_from_all_classes():
    labels = _labels(1000)
    idx = choose_poison_indices(labels, 0.5, seed=0, target=0)
    assert len(labels[idx].unique()) == 10  # target class included


def test_clean_label_picks_only_the_target_class():
    labels = _labels(300)
    target = 4
    n_target = int((labels == target).sum())
    idx = choose_poison_indices(labels, 0.05, seed=1, target=target, clean_label=True)
    assert len(idx) == round(0.05 * 300)
    assert (labels[idx] == target).all()
    # the whole target class is the most a clean-label attack can poison
    pratio_all = n_target / 300
    idx_all = choose_poison_indices(labels, pratio_all, seed=1, target=target, clean_label=True)
    assert torch.equal(idx_all, (labels == target).nonzero().flatten())


def test_clean_label_target_class_too_small_is_user_error():
    labels = torch.tensor([0] * 5 + [1] * 95)
    with pytest.raises(UserError, match="target class 0"):
        choose_poison_indices(labels, 0.1, seed=0, target=0, clean_label=True)


@pytest.mark.parametrize("pratio", [-0.1, 1.01, 2.0, float("nan")])
def test_pratio_outside_unit_interval_is_user_error(pratio):
    with pytest.raises(UserError, match="pratio"):
        choose_poison_indices(_labels(50), pratio, seed=0, target=0)
    with pytest.raises(UserError):
        poison_count(pratio, 50)


# --- poisoned train set and backdoor test set ---------------------------------------------------

def _badnet_fn(channels: int, size: int):
    pattern, mask = triggers.badnet_trigger("square", channels, size)
    return lambda imgs: triggers.apply_badnet(imgs, pattern, mask)


@pytest.mark.parametrize("label_trans", ["all2one", "all2all"])
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_poison_train_set_changes_only_chosen_indices(label_trans, seed):
    classes, target = 5, 2
    images = _images(60, 3, 32, seed)
    labels = _labels(60, classes, seed)
    images_before, labels_before = images.clone(), labels.clone()
    idx = choose_poison_indices(labels, 0.25, seed=seed, target=target)
    trig = _badnet_fn(3, 32)
    out = poison_train_set(images, labels, idx, trig, target, label_trans, classes)

    assert torch.equal(images, images_before) and torch.equal(labels, labels_before), "inputs modified"
    chosen = torch.zeros(60, dtype=torch.bool)
    chosen[idx] = True
    assert torch.equal(out.poison_mask, chosen)
    assert torch.equal(out.true_labels, labels)
    assert torch.equal(out.images[~chosen], images[~chosen])
    assert torch.equal(out.images[chosen], trig(images[chosen]))
    assert torch.equal(out.labels[~chosen], labels[~chosen])
    if label_trans == "all2one":
        assert (out.labels[chosen] == target).all()
    else:
        assert torch.equal(out.labels[chosen], (labels[chosen] + 1) % classes)


def test_poison_train_set_clean_label_keeps_labels():
    classes, target = 4, 1
    images = _images(40, 1, 28, 0)
    labels = _labels(40, classes, 0)
    idx = choose_poison_indices(labels, 0.1, seed=0, target=target, clean_label=True)
    assert len(idx) == 4
    trig = _badnet_fn(1, 28)
    out = poison_train_set(images, labels, idx, trig, target, "all2one", classes, clean_label=True)
    assert torch.equal(out.labels, labels)
    assert torch.equal(out.images[idx], trig(images[idx]))
    assert out.poison_mask.sum() == 4


def test_poison_train_set_with_no_indices_is_a_copy():
    images = _images(10, 3, 32, 0)
    labels = _labels(10, 3, 0)
    out = poison_train_set(images, labels, torch.empty(0, dtype=torch.long), _badnet_fn(3, 32), 0, "all2one", 3)
    assert torch.equal(out.images, images) and torch.equal(out.labels, labels)
    assert not out.poison_mask.any()
    assert out.images.data_ptr() != images.data_ptr()


def test_backdoor_test_set_all2one_excludes_target_class():
    classes, target = 5, 3
    images = _images(50, 3, 32, 4)
    labels = _labels(50, classes, 4)
    trig = _badnet_fn(3, 32)
    bd = backdoor_test_set(images, labels, trig, target, "all2one", classes, batch=7)
    keep = (labels != target).nonzero().flatten()
    assert 0 < len(keep) < 50
    assert torch.equal(bd.source_indices, keep)
    assert torch.equal(bd.true_labels, labels[keep])
    assert (bd.targets == target).all() and len(bd.targets) == len(keep)
    assert torch.equal(bd.images, trig(images[keep]))


def test_backdoor_test_set_all2all_keeps_every_image():
    classes = 5
    images = _images(30, 1, 28, 5)
    labels = _labels(30, classes, 5)
    trig = _badnet_fn(1, 28)
    bd = backdoor_test_set(images, labels, trig, 0, "all2all", classes, batch=4)
    assert torch.equal(bd.source_indices, torch.arange(30))
    assert torch.equal(bd.targets, (labels + 1) % classes)
    assert torch.equal(bd.true_labels, labels)
    assert torch.equal(bd.images, trig(images))


def test_unknown_label_trans_is_user_error():
    with pytest.raises(UserError, match="all2one"):
        backdoor_labels(torch.tensor([0, 1]), 0, "one2one", 10)


# --- attack registry ----------------------------------------------------------------------------

INFO = DatasetInfo("tiny", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, True)


def test_attack_registry_has_documented_attacks_and_rejects_unknown():
    assert {"badnet", "blended"} <= set(ATTACKS)
    with pytest.raises(UserError, match="badnet"):
        get_attack("no-such-attack")


def test_badnet_attack_builds_the_trigger():
    spec = get_attack("badnet")
    params = spec.build({"patch": "square", "patch_size": 3}, INFO)
    x = _images(3, 3, 32, 0)
    out = make_trigger(spec, params, train=True)(x)
    pattern, mask = triggers.badnet_trigger("square", 3, 32)
    assert torch.equal(out, triggers.apply_badnet(x, pattern, mask))


def test_blended_attack_uses_train_and_test_alpha():
    spec = get_attack("blended")
    params = spec.build({"blend_alpha": 0.2, "blend_alpha_test": 0.6, "trigger_path": "", "blend_key": "landscape"}, INFO)
    x = _images(3, 3, 32, 1)
    key = triggers.blend_key(3, 32)
    assert torch.equal(make_trigger(spec, params, True)(x), triggers.apply_blend(x, key, 0.2))
    assert torch.equal(make_trigger(spec, params, False)(x), triggers.apply_blend(x, key, 0.6))
    with pytest.raises(UserError, match="blend_alpha"):
        spec.build({"blend_alpha": 1.5, "blend_alpha_test": 0.2, "trigger_path": "", "blend_key": "landscape"}, INFO)


# --- every registered attack (a new one is enrolled by registering it) ------------------------

def _static_attacks() -> list[str]:
    """Attacks whose trigger comes from `build` alone (no resource step such as LC's PGD images)."""
    return [name for name, spec in sorted(ATTACKS.items()) if spec.prepare is None]


@pytest.mark.parametrize("name", _static_attacks())
@pytest.mark.parametrize("train", [True, False])
def test_every_attack_keeps_dtype_shape_and_is_deterministic(name, train):

    spec = get_attack(name)
    cfg = {o.name: o.default for o in attack_options(spec)}
    info = dataset_info("cifar10")
    params = spec.build(cfg, info)
    images = torch.randint(0, 256, (6, 3, 32, 32), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    out = spec.apply(images.clone(), params, train)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out, spec.apply(images.clone(), params, train)), "same input, same trigger, different output"
    assert not torch.equal(out, images), "the trigger changed nothing"


def test_every_attack_carries_its_title_and_tables_use_it():
    for name, spec in ATTACKS.items():
        assert spec.title, f"{name} has no title"
        assert attack_name(name) == spec.title
    assert attack_name("not-registered") == "not-registered"
