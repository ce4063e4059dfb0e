"""Tests for utils.record: record paths (docs/protocol.md §7), atomic writes, safe loading, staged folders."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from utils.errors import UserError
from utils.record.layout import (FORMAT, FORMAT_VERSION, RECORD_FILE, existing_records, find_record, format_pratio,
                                 record_name, record_path)
from utils.record.store import (REQUIRED_KEYS, StagedFolder, clean_state_dict, load_record, load_state_dict_checked,
                                load_torch_file, save_torch, write_csv, write_json)


class Arbitrary:
    """Not a tensor, not a plain value: `weights_only=True` must refuse to rebuild it."""

    def __init__(self):
        self.payload = "unpickled!"


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _minimal_record(**overrides) -> dict:
    data = {
        "format": FORMAT, "version": FORMAT_VERSION, "model_name": "smallcnn", "num_classes": 10, "in_channels": 1,
        "image_size": 28, "dataset": "fmnist", "attack": "badnet", "attack_target": 0,
        "attack_label_trans": "all2one", "pratio": 0.1, "poison_indices": torch.tensor([1, 5, 7]),
        "trigger": {"pattern": torch.zeros(1, 28, 28, dtype=torch.uint8)}, "model": {"w": torch.ones(2, 2)},
    }
    data.update(overrides)
    return data


# --- names --------------------------------------------------------------------------------------

@pytest.mark.parametrize("pratio,text", [(0.1, "0.1"), (0.01, "0.01"), (0.005, "0.005"), (0.0, "0.0"), (0, "0.0"),
                                         (1, "1.0"), (0.05, "0.05")])
def test_format_pratio_as_python_prints_it(pratio, text):
    assert format_pratio(pratio) == text


@pytest.mark.parametrize("pratio,folder", [(0.1, "pratio_0.1"), (0.005, "pratio_0.005"), (0.0, "pratio_0.0")])
def test_record_path_layout(tmp_path, pratio, folder):
    path = record_path(tmp_path, "cifar10", "badnet", pratio, 0, "preactresnet18")
    assert path == tmp_path / "cifar10" / "badnet" / f"{folder}-target_0-archi_preactresnet18"
    assert record_name(pratio, 3, "vgg19_bn") == f"{folder}-target_3-archi_vgg19_bn"
    assert not path.exists()  # computing a path creates nothing


# --- atomic writes ------------------------------------------------------------------------------

def test_writers_leave_no_temp_files(tmp_path):
    out = tmp_path / "deep" / "er"
    write_json(out / "summary.json", {"asr": 0.5, "path": Path("a/b"), "t": torch.tensor([1, 2])})
    write_csv(out / "metrics.csv", [{"epoch": 1, "acc": 0.123456789}, {"epoch": 2, "asr": 1.0}])
    save_torch(out / "x.pt", {"w": torch.arange(4)})
    assert _entries(out) == ["metrics.csv", "summary.json", "x.pt"]
    assert json.loads((out / "summary.json").read_text()) == {"asr": 0.5, "path": "a/b", "t": [1, 2]}
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [{"epoch": "1", "acc": "0.123457", "asr": ""}, {"epoch": "2", "acc": "", "asr": "1"}]
    assert torch.equal(load_torch_file(out / "x.pt", "test file")["w"], torch.arange(4))
    # overwriting in place also leaves nothing behind
    write_json(out / "summary.json", [1])
    save_torch(out / "x.pt", {"w": torch.zeros(1)})
    assert _entries(out) == ["metrics.csv", "summary.json", "x.pt"]
    assert json.loads((out / "summary.json").read_text()) == [1]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "summary.json"
    write_json(target, {"old": True})
    before = target.read_bytes()
    with pytest.raises(TypeError):
        write_json(target, {"bad": object()})
    assert target.read_bytes() == before
    assert _entries(tmp_path) == ["summary.json"]


def test_write_csv_of_no_rows_is_empty_file(tmp_path):
    write_csv(tmp_path / "m.csv", [])
    assert (tmp_path / "m.csv").read_text() == ""
    assert _entries(tmp_path) == ["m.csv"]


# --- safe loading -------------------------------------------------------------------------------

def _assert_one_line_error_and_untouched(path: Path, exc_info, before: bytes, mtime: int):
    msg = str(exc_info.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    assert str(path) in msg
    assert path.read_bytes() == before
    assert os.stat(path).st_mtime_ns == mtime


def test_load_truncated_file_is_user_error(tmp_path):
    path = tmp_path / RECORD_FILE
    save_torch(path, {"w": torch.randn(64, 64), "n": 3})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    before, mtime = path.read_bytes(), os.stat(path).st_mtime_ns
    with pytest.raises(UserError) as info:
        load_torch_file(path, "record file")
    _assert_one_line_error_and_untouched(path, info, before, mtime)


@pytest.mark.parametrize("seed", [0, 1])
def test_load_random_bytes_is_user_error(tmp_path, seed):
    path = tmp_path / "junk.pt"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(seed),
                                   dtype=torch.uint8).numpy().tobytes())
    before, mtime = path.read_bytes(), os.stat(path).st_mtime_ns
    with pytest.raises(UserError) as info:
        load_torch_file(path, "record file")
    _assert_one_line_error_and_untouched(path, info, before, mtime)


def test_load_empty_file_is_user_error(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(UserError):
        load_torch_file(path, "record file")


@pytest.mark.parametrize("legacy", [False, True])
def test_load_refuses_pickled_objects(tmp_path, legacy):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "obj": Arbitrary()}, path,
               _use_new_zipfile_serialization=not legacy)
    before, mtime = path.read_bytes(), os.stat(path).st_mtime_ns
    with pytest.raises(UserError) as info:
        load_torch_file(path, "record file")
    _assert_one_line_error_and_untouched(path, info, before, mtime)


def test_load_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_torch_file(tmp_path / "nope.pt", "record file")


def test_load_record_roundtrip_and_validation(tmp_path):
    folder = tmp_path / "rec"
    save_torch(folder / RECORD_FILE, _minimal_record())
    data = load_record(folder)
    assert data["format"] == FORMAT and torch.equal(data["poison_indices"], torch.tensor([1, 5, 7]))
    assert set(REQUIRED_KEYS) <= set(data)

    save_torch(folder / RECORD_FILE, {k: v for k, v in _minimal_record().items() if k != "format"})
    with pytest.raises(UserError, match=FORMAT):
        load_record(folder)
    save_torch(folder / RECORD_FILE, [1, 2, 3])
    with pytest.raises(UserError, match=FORMAT):
        load_record(folder)
    save_torch(folder / RECORD_FILE, {k: v for k, v in _minimal_record().items() if k != "poison_indices"})
    with pytest.raises(UserError, match="poison_indices"):
        load_record(folder)
    save_torch(folder / RECORD_FILE, _minimal_record(version=FORMAT_VERSION + 1))
    with pytest.raises(UserError, match="format"):
        load_record(folder)
    with pytest.raises(UserError, match="no record"):
        load_record(tmp_path / "elsewhere")


def _make_record(root: Path, dataset: str, attack: str, pratio: float, target: int, model: str) -> Path:
    folder = record_path(root, dataset, attack, pratio, target, model)
    save_torch(folder / RECORD_FILE, _minimal_record())
    return folder


def test_find_record_present_and_missing(tmp_path):
    root = tmp_path / "record"
    found = _make_record(root, "cifar10", "badnet", 0.1, 0, "resnet18")
    _make_record(root, "fmnist", "blended", 0.005, 2, "smallcnn")
    (root / "cifar10" / "badnet" / "half-written").mkdir()  # no attack_result.pt: not a record
    assert find_record(root, "cifar10", "badnet", 0.1, 0, "resnet18") == found
    assert existing_records(root) == ["cifar10/badnet/pratio_0.1-target_0-archi_resnet18",
                                      "fmnist/blended/pratio_0.005-target_2-archi_smallcnn"]

    with pytest.raises(UserError) as info:
        find_record(root, "cifar10", "badnet", 0.05, 0, "resnet18")
    msg = str(info.value)
    looked_for = record_path(root, "cifar10", "badnet", 0.05, 0, "resnet18") / RECORD_FILE
    assert str(looked_for) in msg
    assert "cifar10/badnet/pratio_0.1-target_0-archi_resnet18" in msg
    assert "fmnist/blended/pratio_0.005-target_2-archi_smallcnn" in msg
    assert "half-written" not in msg


def test_find_record_with_no_records(tmp_path):
    with pytest.raises(UserError, match="none") as info:
        find_record(tmp_path / "empty", "cifar10", "badnet", 0.1, 0, "resnet18")
    assert "pratio_0.1-target_0-archi_resnet18" in str(info.value)


# --- staged folders -----------------------------------------------------------------------------

def _old_result(tmp_path: Path) -> Path:
    final = tmp_path / "cifar10" / "badnet" / "pratio_0.1-target_0-archi_resnet18"
    final.mkdir(parents=True)
    (final / RECORD_FILE).write_bytes(b"old record")
    (final / "defense").mkdir()
    (final / "defense" / "old.txt").write_text("old defense output")
    return final


def test_staged_folder_without_overwrite_refuses_before_creating_anything(tmp_path):
    final = _old_result(tmp_path)
    before_tree = _snapshot(tmp_path)
    before_parent = _entries(final.parent)
    with pytest.raises(UserError, match="overwrite"):
        StagedFolder(final, overwrite=False, what="attack result", marker=RECORD_FILE)
    assert _entries(final.parent) == before_parent
    assert _snapshot(tmp_path) == before_tree


def test_staged_folder_overwrite_replaces_only_at_commit(tmp_path):
    final = _old_result(tmp_path)
    old_tree = _snapshot(final)
    staged = StagedFolder(final, overwrite=True, what="attack result", marker=RECORD_FILE)
    assert staged.stage.is_dir() and staged.stage.parent == final.parent and staged.stage != final
    (staged.stage / RECORD_FILE).write_bytes(b"new record")
    (staged.stage / "summary.json").write_text("{}")
    assert _snapshot(final) == old_tree, "the old result changed before commit"
    staged.commit()
    assert _snapshot(final) == {RECORD_FILE: b"new record", "summary.json": b"{}"}
    assert _entries(final.parent) == [final.name], "staging or old folders left behind"


def test_staged_folder_abort_keeps_old_result(tmp_path):
    final = _old_result(tmp_path)
    old_tree = _snapshot(final)
    staged = StagedFolder(final, overwrite=True, what="attack result", marker=RECORD_FILE)
    (staged.stage / RECORD_FILE).write_bytes(b"half")
    staged.abort()
    assert not staged.stage.exists()
    assert _snapshot(final) == old_tree
    assert _entries(final.parent) == [final.name]


def test_staged_folder_fresh_result(tmp_path):
    final = tmp_path / "a" / "b" / "result"
    staged = StagedFolder(final, overwrite=False, what="defense result", marker="summary.json")
    assert not final.exists()
    (staged.stage / "summary.json").write_text("1")
    staged.commit()
    assert _snapshot(final) == {"summary.json": b"1"}
    assert _entries(final.parent) == ["result"]


def test_resumable_staged_folder_is_found_again(tmp_path):
    final = tmp_path / "rec" / "result"
    first = StagedFolder(final, overwrite=False, what="attack result", marker=RECORD_FILE, resumable=True)
    (first.stage / "checkpoint.pt").write_bytes(b"epoch 3")
    # the run is interrupted here (it gives the folder up, keeping its stage); a new run with the
    # same settings finds the checkpoint (a run killed with -9 leaves its lock: tests/test_concurrency.py)
    first.release()
    second = StagedFolder(final, overwrite=False, what="attack result", marker=RECORD_FILE, resumable=True)
    assert second.stage == first.stage
    assert (second.stage / "checkpoint.pt").read_bytes() == b"epoch 3"
    (second.stage / RECORD_FILE).write_bytes(b"done")
    second.commit()
    assert (final / RECORD_FILE).read_bytes() == b"done"
    assert _entries(final.parent) == ["result"]


# --- state dicts --------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["conv.weight", "module.conv.weight", "_orig_mod.conv.weight",
                                 "module._orig_mod.conv.weight", "_orig_mod.module.conv.weight",
                                 "module.module.conv.weight"])
def test_clean_state_dict_strips_wrapper_prefixes(key):
    value = torch.randn(2, 3, requires_grad=True)
    out = clean_state_dict({key: value, "module.bn.running_mean": torch.zeros(2)})
    assert set(out) == {"conv.weight", "bn.running_mean"}
    torch.testing.assert_close(out["conv.weight"], value.detach())
    assert not out["conv.weight"].requires_grad
    assert out["conv.weight"].data_ptr() != value.data_ptr(), "must be a copy"


def test_clean_state_dict_keeps_inner_module_names():
    out = clean_state_dict({"encoder.module.weight": torch.ones(1), "x_orig_mod.y": torch.ones(1)})
    assert set(out) == {"encoder.module.weight", "x_orig_mod.y"}


def test_load_state_dict_checked(tmp_path):
    model = torch.nn.Linear(3, 2)
    state = {f"module.{k}": torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    load_state_dict_checked(model, state, "record x")
    assert (model.weight == 0.5).all()
    with pytest.raises(UserError, match="record x") as info:
        load_state_dict_checked(torch.nn.Linear(4, 2), state, "record x")
    assert "\n" not in str(info.value)


def test_staged_folder_abort_removes_the_folders_it_made(tmp_path):
    existing = tmp_path / "record"
    existing.mkdir()
    staged = StagedFolder(existing / "cifar10" / "badnet" / "pratio_0.1-target_0-archi_x", False, "record", "m")
    assert staged.stage.exists()
    staged.abort()
    assert existing.exists() and list(existing.iterdir()) == []


def test_portable_path_never_absolute(tmp_path):
    from utils.record.store import portable_path
    assert portable_path("data") == "data"
    assert portable_path(str(tmp_path / "tiny-data")) == "tiny-data"
    assert not portable_path(str(Path(__file__).resolve())).startswith("/")


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """Not mkstemp's owner-only 0600: records are shared (cluster groups, docs figures)."""
    import os
    from utils.record.store import write_text
    mask = os.umask(0)
    os.umask(mask)
    write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask
