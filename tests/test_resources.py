"""The attack-resource cache: keyed, checksummed, resumable; and the trained surrogate model."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import flip_middle_byte
from utils import engine
from utils.data.datasets import ImageSet, dataset_info
from utils.record.resources import META_FILE, PARTIAL_FILE, RESOURCE_FILE, Resource, state_digest, tensor_digest
from utils.attacks.surrogate import get_surrogate

KEY = {"dataset": "fmnist", "image_size": 28, "seed": 0, "steps": 3}


def _counting_build(calls: list, value: float = 1.0):
    def build(progress):
        calls.append(progress.load())
        return {"x": torch.full((2,), value)}, {"quality": 0.5}
    return build


def test_second_get_uses_the_cache_and_keeps_info(tmp_path, capsys):
    calls: list = []
    first = Resource("demo", KEY, tmp_path).get(_counting_build(calls))
    again = Resource("demo", KEY, tmp_path)
    second = again.get(_counting_build(calls, value=2.0))
    assert len(calls) == 1 and torch.equal(first["x"], second["x"])
    assert again.info == {"quality": 0.5}
    assert "using the cache" in capsys.readouterr().out
    meta = json.loads((again.folder / META_FILE).read_text())
    assert meta["key"]["steps"] == 3 and len(meta["sha256"]) == 64


@pytest.mark.parametrize("change", [{"dataset": "cifar10"}, {"image_size": 32}, {"seed": 1}, {"steps": 4}])
def test_other_dataset_size_seed_or_setting_gets_its_own_folder(tmp_path, change):
    calls: list = []
    base = Resource("demo", KEY, tmp_path)
    base.get(_counting_build(calls))
    other = Resource("demo", {**KEY, **change}, tmp_path)
    assert other.folder != base.folder
    other.get(_counting_build(calls))
    assert len(calls) == 2


def test_a_folder_holding_another_key_is_rebuilt(tmp_path, capsys):
    res = Resource("demo", KEY, tmp_path)
    res.get(_counting_build([]))
    meta_path = res.folder / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["key"]["steps"] = 99  # e.g. copied in from elsewhere
    meta_path.write_text(json.dumps(meta))
    calls: list = []
    Resource("demo", KEY, tmp_path).get(_counting_build(calls))
    err = capsys.readouterr().err
    assert len(calls) == 1 and err.count("other settings") == 1  # said once, though looked at twice


def test_corrupt_payload_is_detected_by_checksum_and_rebuilt(tmp_path, capsys):
    res = Resource("demo", KEY, tmp_path)
    res.get(_counting_build([]))
    data = res.folder / RESOURCE_FILE
    flip_middle_byte(data)
    calls: list = []
    out = Resource("demo", KEY, tmp_path).get(_counting_build(calls, value=3.0))
    assert len(calls) == 1 and float(out["x"][0]) == 3.0
    assert capsys.readouterr().err.count("checksum") == 1


def test_killed_build_resumes_from_its_saved_progress(tmp_path):
    res = Resource("demo", KEY, tmp_path)

    def dies(progress):
        progress.save({"done": 2})
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        res.get(dies)
    assert (res.folder / PARTIAL_FILE).exists() and not (res.folder / RESOURCE_FILE).exists()
    calls: list = []
    Resource("demo", KEY, tmp_path).get(_counting_build(calls))
    assert calls == [{"done": 2}]
    assert not (res.folder / PARTIAL_FILE).exists()
    # progress saved under another key is not picked up
    other = Resource("demo", {**KEY, "steps": 5}, tmp_path)
    other.folder.mkdir(parents=True)
    (other.folder / PARTIAL_FILE).write_bytes((res.folder / RESOURCE_FILE).read_bytes())
    calls = []
    other.get(_counting_build(calls))
    assert calls == [None]


def test_digests_depend_on_content():
    a = torch.arange(5)
    assert tensor_digest(a) == tensor_digest(a.clone()) != tensor_digest(a + 1)
    assert tensor_digest(None) == "all"
    s1 = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    s2 = {"w": torch.ones(2, 2), "b": torch.tensor([0.0, 1e-7])}
    assert state_digest(s1) == state_digest({k: v.clone() for k, v in s1.items()}) != state_digest(s2)


def _ctx(tmp_path, epochs=1, seed=0):
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 10
    images = (labels.view(-1, 1, 1, 1) * 20 + torch.randint(0, 30, (60, 1, 28, 28), generator=gen)).to(torch.uint8)
    data = ImageSet(images, labels)
    cfg = {"surrogate_record": "", "surrogate_model": "smallcnn", "surrogate_epochs": epochs, "model": "smallcnn",
           "epochs": 5, "random_seed": seed, "lr": 0.05, "batch_size": 20, "sgd_momentum": 0.9, "wd": 5e-4,
           "lr_scheduler": "cosine", "input_size": 0, "eval_batch_size": 0}
    return SimpleNamespace(cfg=cfg, info=dataset_info("fmnist"), train=data, test=data, train_indices=None,
                           device=torch.device("cpu"), amp=None, progress=False, resource_root=str(tmp_path))


def test_trained_surrogate_is_cached_and_identified_by_its_weights(tmp_path, capsys):
    first = get_surrogate(_ctx(tmp_path))
    assert not first.model.training and first.identity["epochs"] == 1
    second = get_surrogate(_ctx(tmp_path))
    assert "using the cache" in capsys.readouterr().out
    assert first.identity == second.identity
    x = engine.Pipeline.for_dataset(dataset_info("fmnist"), torch.device("cpu")).eval_batch(_ctx(tmp_path).train.images[:4])
    assert torch.equal(first.model(x), second.model(x))
    other = get_surrogate(_ctx(tmp_path, seed=1))
    assert other.identity["weights"] != first.identity["weights"]
