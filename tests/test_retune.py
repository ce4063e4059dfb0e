"""The retuning attack (fine_tune/ft_poison.py) and the new purification modes through ft.py."""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import REPO_ROOT, copy_record
from utils import engine
from utils.commands import finetune
from utils.robustness import retune, table as robustness_table
from utils.errors import UserError
from utils.record.store import load_record
from utils.victim.experiment import rebuild_experiment

CPU = torch.device("cpu")


def _common(root: Path, data: Path) -> list[str]:
    return ["--record_root", str(root), "--dataset_path", str(data), "--dataset", "cifar10", "--attack", "badnet",
            "--model", "smallcnn", "--device", "cpu", "--progress", "false"]


@pytest.fixture(scope="module")
def purified(badnet_record, tiny_cifar10, tmp_path_factory):
    """A record copy purified with fst (split 0.1, seed 3: not the defaults, so that reusing them is
    tested) and with ft-sam, bti and pam (tiny settings)."""
    root = tmp_path_factory.mktemp("retune")
    folder = copy_record(badnet_record, root)
    finetune.main(_common(root, tiny_cifar10) + ["--ft_mode", "fst,ft-sam", "--epochs", "1", "--split_ratio", "0.1",
                                                 "--random_seed", "3"])
    finetune.main(_common(root, tiny_cifar10) + ["--ft_mode", "bti,pam", "--epochs", "1", "--rounds", "2",
                                                 "--split_ratio", "0.1", "--bti_pretrain_epochs", "1",
                                                 "--bti_mask_epochs", "1", "--bti_gen_epochs", "1",
                                                 "--bti_unet_width", "4"])
    return root, folder, tiny_cifar10


def test_new_modes_write_results_like_the_five(purified):
    root, folder, _ = purified
    for mode in ("fst", "ft-sam", "bti", "pam"):
        out = folder / "defense" / mode
        result = json.loads((out / "result.json").read_text())
        assert result["ft_mode"] == mode and (out / "metrics.csv").is_file() and (out / "model.pt").is_file()
        assert 0.0 <= result["after"]["asr"] <= 1.0
    sam = json.loads((folder / "defense" / "ft-sam" / "result.json").read_text())
    assert sam["args"]["lb_smooth"] == 0.1 and sam["args"]["sam_rho"] == 2.0  # FT-SAM's own defaults
    pam = json.loads((folder / "defense" / "pam" / "result.json").read_text())
    # two rounds of one epoch, each round starting with a trigger inversion
    assert [r["round"] for r in pam["inversion"]] == [1, 2]
    assert all(0 <= r["detected_target"] < 10 and 0 < r["target_share"] <= 1 for r in pam["inversion"])
    assert pam["args"]["momentum"] == 0.1 and pam["args"]["rounds"] == 2
    lines = (folder / "defense" / "pam" / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",")[:2] == ["epoch", "round"] and len(lines) == 3
    # the official schedules: constant learning rates across all rounds (SGD 0.01 for PAM, Adam 1e-4 for BTI)
    for mode, lr in (("pam", 0.01), ("bti", 1e-4)):
        rows = list(csv.DictReader((folder / "defense" / mode / "metrics.csv").open()))
        assert [float(r["lr"]) for r in rows] == [lr, lr]
        result = json.loads((folder / "defense" / mode / "result.json").read_text())
        assert result["args"]["lr"] == lr and all(r["generator_trained"] for r in result["inversion"])


def _plan_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"split_ratio": None, "split_mode": None, "random_seed": None, "dataset": "cifar10",
                                 "ra_split": "shared", **kw})


def test_every_defense_faces_the_same_retuning_set_by_default(purified):
    """FST (split 0.1, seed 3), PAM (split 0.1, seed 0) and the unpurified model get one RA set: a
    0.02 split drawn with seed 42 and the same poisoned samples at the same positions; --ra_split
    defense gives each its own purification subset back."""
    _, folder, data = purified
    record = load_record(folder)
    exp = rebuild_experiment(record, str(data), CPU)
    plans = {t: retune.tuning_plan(_plan_args(), folder, t) for t in ("fst", "pam", "none")}
    assert all(p == {"source": "shared", "split_ratio": 0.02, "random_seed": 42, "split_mode": "uniform", "digest": None}
               for p in plans.values())
    sets = {t: retune.retuning_set(exp, record, p, 5, seed=p["random_seed"]) for t, p in plans.items()}
    shared = finetune.tuning_set(exp.clean_train.labels, argparse.Namespace(split_ratio=0.02, random_seed=42,
                                                                             split_mode="uniform"))
    for got in sets.values():
        assert torch.equal(got["tuning_indices"], shared)
        assert torch.equal(got["images"], sets["fst"]["images"]) and torch.equal(got["labels"], sets["fst"]["labels"])
        assert got["set_digest"] == sets["fst"]["set_digest"] and int(got["poisoned"].sum()) == 5
    own = {t: retune.tuning_plan(_plan_args(ra_split="defense"), folder, t) for t in ("fst", "pam")}
    assert [(own[t]["source"], own[t]["split_ratio"], own[t]["random_seed"]) for t in ("fst", "pam")] == \
        [("defense", 0.1, 3), ("defense", 0.1, 0)]
    for t in ("fst", "pam"):
        purification = json.loads((folder / "defense" / t / "result.json").read_text())
        assert retune.retuning_set(exp, record, own[t], 5, seed=0)["digest"] == purification["tuning_digest"]


class _Recorder(nn.Module):
    """A linear model that keeps every input batch it is given."""

    def __init__(self, features: int, classes: int):
        super().__init__()
        self.linear = nn.Linear(features, classes)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().flatten(1).clone())
        return self.linear(x.flatten(1))


class _AlwaysFlip(engine.Pipeline):
    def augment(self, x_u8, gen=None):
        return x_u8.flip(3)


def _retune_inputs(pipeline, mode: str, epochs: int = 3):
    """Run retune() on 12 random 6x6 images (2 of them poisoned); returns the images, the poisoned
    mask and, per epoch, every input row that reached the model."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 1, 6, 6), generator=g, dtype=torch.uint8)
    poisoned = torch.zeros(12, dtype=torch.bool)
    poisoned[[2, 7]] = True
    data = {"images": images, "labels": torch.arange(12) % 3, "poisoned": poisoned}
    model = _Recorder(36, 3)
    args = argparse.Namespace(lr=0.01, momentum=0.9, epochs=epochs, batch_size=5, augment=mode, progress=False)
    exp = SimpleNamespace(device=CPU, pipeline=pipeline)
    retune.retune(model, data, exp, args, 0, None, lambda m: {})
    per_epoch = [torch.cat(model.seen[i:i + 3]) for i in range(0, len(model.seen), 3)]  # 3 batches per epoch
    return images, poisoned, per_epoch


def _contains(rows: torch.Tensor, x: torch.Tensor) -> bool:
    return bool((rows == x.flatten()).all(1).any())


def _plain(x_u8):  # the evaluation transform of the test pipelines (mean 0, std 1)
    return x_u8.float() / 255


def test_retuning_augments_the_clean_samples_and_leaves_the_poisoned_ones_alone():
    """With a pipeline that always flips: the poisoned samples reach the loss unflipped, the clean
    ones flipped (a flipped BadNet patch would sit in the other corner)."""
    flip = _AlwaysFlip(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1), 6, 6, True, pad=0)
    for mode in ("once", "epoch"):
        images, poisoned, per_epoch = _retune_inputs(flip, mode)
        for rows in per_epoch:
            assert len(rows) == 12
            for i in range(12):
                if poisoned[i]:
                    assert _contains(rows, _plain(images[i])) and not _contains(rows, _plain(images[i].flip(2)))
                else:
                    assert _contains(rows, _plain(images[i].flip(2))) and not _contains(rows, _plain(images[i]))
    # --augment all, the earlier behaviour: the poisoned samples are flipped as well
    images, poisoned, per_epoch = _retune_inputs(flip, "all")
    assert all(_contains(rows, _plain(images[i].flip(2))) for rows in per_epoch for i in (2, 7))


def test_retuning_draws_the_clean_augmentation_once_by_default():
    """Officially the set is built once with its augmentation drawn then: every epoch sees the same
    crops; --augment epoch draws new ones each epoch."""
    pipe = engine.Pipeline(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1), 6, 6, True, pad=2)
    _, _, once = _retune_inputs(pipe, "once")
    same = lambda a, b: bool((a[:, None] == b[None]).all(-1).any(1).all())  # noqa: E731
    assert same(once[0], once[1]) and same(once[0], once[2])
    _, _, fresh = _retune_inputs(pipe, "epoch")
    assert not same(fresh[0], fresh[1])


def test_retuning_set_changes_only_poison_num_samples_of_the_purification_subset(purified):
    root, folder, data = purified
    record = load_record(folder)
    exp = rebuild_experiment(record, str(data), CPU)
    plan = retune.tuning_plan(_plan_args(ra_split="defense"), folder, "fst")
    assert (plan["split_ratio"], plan["random_seed"]) == (0.1, 3)
    data_set = retune.retuning_set(exp, record, plan, 5, seed=3)
    used = finetune.tuning_set(exp.clean_train.labels, argparse.Namespace(split_ratio=0.1, random_seed=3,
                                                                           split_mode="uniform"))
    assert torch.equal(data_set["tuning_indices"], used)
    clean_images = exp.clean_train.images[used]
    clean_labels = exp.clean_train.labels[used]
    changed = ((data_set["images"] != clean_images).flatten(1).any(1) | (data_set["labels"] != clean_labels))
    assert sorted(torch.nonzero(changed).flatten().tolist()) == data_set["positions"]
    assert torch.nonzero(data_set["poisoned"]).flatten().tolist() == data_set["positions"]
    assert len(data_set["positions"]) == 5
    # the replacements are the record's own poisoned training samples, labelled as the target
    assert not data_set["made"]
    idx = torch.tensor(data_set["train_indices"])
    assert set(idx.tolist()) <= set(exp.poison_indices.tolist())
    pos = torch.tensor(data_set["positions"])
    assert torch.equal(data_set["images"][pos], exp.train.images[idx])
    assert (data_set["labels"][pos] == record["attack_target"]).all()


def test_poisoned_samples_are_made_when_the_record_has_too_few(purified):
    _, folder, data = purified
    record = load_record(folder)
    exp = rebuild_experiment(record, str(data), CPU)
    n = len(exp.poison_indices) + 3
    made = retune.poisoned_samples(exp, record, n, seed=0)
    assert made["made"] and len(made["labels"]) == n
    assert (made["labels"] == record["attack_target"]).all()
    idx = torch.tensor(made["train_indices"])
    assert (exp.train.true_labels[idx] != record["attack_target"]).all()  # all2one: from other classes
    assert not set(idx.tolist()) & set(exp.poison_indices.tolist())
    # BadNet's patch is in the images (they differ from the clean ones only in a small area)
    diff = (made["images"] != exp.train.images[idx]).flatten(1).float().mean(1)
    assert (diff > 0).all() and (diff < 0.1).all()


def test_ft_poison_cli_end_to_end(purified):
    root, folder, data = purified
    results = retune.main(_common(root, data) + ["--defense_type", "fst,none", "--epochs", "2"])
    fst = json.loads((folder / "defense" / "fst" / "retune" / "result.json").read_text())
    purification = json.loads((folder / "defense" / "fst" / "result.json").read_text())
    # "before" is the purified model itself: its metrics are the purification's "after"
    for key in ("clean_acc", "asr", "ra"):
        assert fst["before"][key] == pytest.approx(purification["after"][key], abs=1e-6)
    assert fst["poison_num"] == 5 and fst["augment"] == "once" and fst["seed"] == 42
    assert len((folder / "defense" / "fst" / "retune" / "metrics.csv").read_text().splitlines()) == 3
    assert (folder / "defense" / "fst" / "retune" / "model.pt").is_file()
    none = json.loads((folder / "retune" / "result.json").read_text())
    assert none["defense_type"] == "none" and set(results) == {"fst", "none"}
    # one RA set for both, whatever split FST tuned on (0.1, seed 3); result.json says which
    for result in (fst, none):
        assert result["tuning"] == {"source": "shared", "split_ratio": 0.02, "random_seed": 42, "split_mode": "uniform"}
        assert result["tuning_size"] == 6
    assert fst["ra_set_digest"] == none["ra_set_digest"] and fst["tuning_digest"] == none["tuning_digest"]
    assert fst["tuning_digest"] != purification["tuning_digest"]
    # --ra_split defense: the purification's own subset again
    retune.main(_common(root, data) + ["--defense_type", "fst", "--epochs", "1", "--ra_split", "defense", "--tag", "own"])
    own = json.loads((folder / "defense" / "fst" / "retune_own" / "result.json").read_text())
    assert own["tuning"]["source"] == "defense" and own["tuning_digest"] == purification["tuning_digest"]
    assert own["seed"] == 3 and own["tuning_size"] == 30
    # a second run refuses before any work, and keeps the first result
    stamp = (folder / "defense" / "fst" / "retune" / "result.json").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        retune.main(_common(root, data) + ["--defense_type", "fst"])
    assert (folder / "defense" / "fst" / "retune" / "result.json").read_bytes() == stamp
    # the robustness table reads these results; what is missing shows as "-"
    table = robustness_table.main([str(root), "--dataset", "cifar10", "--model", "smallcnn", "--attacks", "badnet"])
    title, body, notes = table.split("\n\n")
    assert title == "**badnet** (cifar10/smallcnn, pratio 0.1)"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in body.splitlines()[2:]}
    # the table reads the untagged results: FST and no defense, both retuned on the shared set
    assert notes == "RA set (badnet): shared split 0.02 seed 42 (6 images), 5 poisoned, every row"
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    assert rows["FST"] == [pct(purification["after"]["clean_acc"]), pct(purification["after"]["asr"]),
                           pct(fst["after"]["clean_acc"]), pct(fst["after"]["asr"])]
    assert rows["no defense"][:2] == [pct(none["before"]["clean_acc"]), pct(none["before"]["asr"])]
    assert rows["FT"] == ["-"] * 4 and rows["clean model"] == ["-"] * 4
    assert rows["PAM"][0] != "-" and rows["PAM"][2] == "-"


def test_ft_poison_errors(purified, tmp_path):
    root, folder, data = purified
    cases = [
        (["--defense_type", "lp"], "no purified model"),
        (["--defense_type", "fst", "--split_ratio", "0.5", "--ra_split", "defense", "--tag", "x"],
         "apply only to --defense_type none"),
        (["--defense_type", "fst", "--poison_num", "-1"], "--poison_num"),
        (["--defense_type", "fst", "--poison_num", "1000", "--tag", "big"], "exceeds"),
        (["--defense_type", "../x"], "not a folder name"),
    ]
    for extra, message in cases:
        with pytest.raises(UserError, match=message):
            retune.main(_common(root, data) + extra)
    assert not [p for p in (folder / "defense" / "fst").glob("retune_*") if p.name != "retune_own"], \
        "a failed run left a folder behind"
    # a purification without weights, and a changed tuning subset, are named as such
    nosave = folder / "defense" / "ft-sam"
    (nosave / "model.pt").rename(tmp_path / "model.pt")
    try:
        with pytest.raises(UserError, match="--save false"):
            retune.main(_common(root, data) + ["--defense_type", "ft-sam"])
    finally:
        (tmp_path / "model.pt").rename(nosave / "model.pt")
    result_path = folder / "defense" / "bti" / "result.json"
    original = result_path.read_text()
    result_path.write_text(original.replace(json.loads(original)["tuning_digest"], "0" * 16))
    try:
        with pytest.raises(UserError, match="differs from the one the purification used"):
            retune.main(_common(root, data) + ["--defense_type", "bti", "--ra_split", "defense", "--tag", "digest"])
    finally:
        result_path.write_text(original)


def test_ft_poison_script_exit_code(purified):
    root, _, data = purified
    proc = subprocess.run([sys.executable, "fine_tune/ft_poison.py", *_common(root, data), "--defense_type", "nope"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: no purified model") and "Traceback" not in proc.stderr


def test_robustness_table_names_differing_retuning_sets(tmp_path):
    """A table whose rows were retuned on different sets says so (older results, without a source,
    used the purification's own subset)."""
    rec = tmp_path / "cifar10" / "badnet" / "pratio_0.1-target_0-archi_smallcnn"
    metrics = {"clean_acc": 0.9, "asr": 0.1, "ra": 0.8}
    shared = {"source": "shared", "split_ratio": 0.02, "random_seed": 42, "split_mode": "uniform"}
    older = {"split_ratio": 0.05, "random_seed": 0, "split_mode": "uniform"}
    for folder, tuning, size in ((rec / "retune", shared, 6), (rec / "defense" / "fst" / "retune", shared, 6),
                                 (rec / "defense" / "pam" / "retune", older, 15)):
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps({"before": metrics, "after": metrics, "tuning": tuning,
                                                        "tuning_size": size, "poison_num": 5}))
    table = robustness_table.markdown(tmp_path, "cifar10", "smallcnn", ["badnet"])
    assert table.splitlines()[-1] == ("RA sets (badnet) differ: no defense, FST: shared split 0.02 seed 42 (6 images), "
                                      "5 poisoned; PAM: the defense's own split 0.05 seed 0 (15 images), 5 poisoned")


def test_robustness_table_shows_each_retuning_tag_and_the_qra_columns(tmp_path):
    rec = tmp_path / "fmnist" / "badnet" / "pratio_0.1-target_0-archi_smallcnn"
    clean = tmp_path / "fmnist" / "badnet" / "pratio_0.0-target_0-archi_smallcnn"

    def put(folder, payload):
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps(payload))

    m = lambda acc, asr: {"clean_acc": acc, "asr": asr, "ra": 0.0}  # noqa: E731
    put(rec / "defense" / "pam", {"after": m(0.9, 0.02)})
    put(rec / "defense" / "pam" / "retune", {"before": m(0.9, 0.02), "after": m(0.89, 0.10), "poison_num": 5})
    put(rec / "defense" / "pam" / "retune_p20", {"before": m(0.9, 0.02), "after": m(0.88, 0.40), "poison_num": 20})
    put(rec / "defense" / "pam" / "qra", {"after": {"purified": m(0.5, 0.30), "clean": m(0.5, 0.05)}})
    put(clean / "retune", {"before": m(0.91, 0.01), "after": m(0.9, 0.03), "poison_num": 5})
    table = robustness_table.markdown(tmp_path, "fmnist", "smallcnn", ["badnet"], tags=["", "p20"], qra=True)
    lines = table.splitlines()
    assert "| model | C-Acc | O-ASR | C-Acc after RA 5 | P-ASR (RA 5) | C-Acc after RA 20 | P-ASR (RA 20) | QRA ASR | " \
           "QRA ASR on clean model |" in lines
    assert "| PAM | 90.00 | 2.00 | 89.00 | 10.00 | 88.00 | 40.00 | 30.00 | 5.00 |" in lines
    assert "| clean model | 91.00 | 1.00 | 90.00 | 3.00 | - | - | - | - |" in lines


def test_robustness_table_adds_every_mode_that_ran_and_takes_modes(tmp_path, capsys):
    rec = tmp_path / "fmnist" / "badnet" / "pratio_0.1-target_0-archi_smallcnn"
    m = {"clean_acc": 0.8, "asr": 0.5, "ra": 0.1}
    for mode in ("nc", "pam"):
        (rec / "defense" / mode).mkdir(parents=True)
        (rec / "defense" / mode / "result.json").write_text(json.dumps({"after": m}))
    labels = lambda table: [line.split("|")[1].strip() for line in table.splitlines()  # noqa: E731
                            if line.startswith("| ") and not line.startswith("| model")]
    table = robustness_table.markdown(tmp_path, "fmnist", "smallcnn", ["badnet"])
    assert labels(table) == ["clean model", "no defense", "FT", "FST", "FT-SAM", "BTI", "PAM", "NC"]
    assert "| NC | 80.00 | 50.00 | - | - |" in table.splitlines()
    table = robustness_table.main([str(tmp_path), "--attacks", "badnet", "--modes", "nc,pam"])
    assert labels(table) == ["clean model", "no defense", "NC", "PAM"]
    with pytest.raises(UserError, match="--modes 'nope': not a purification mode"):
        robustness_table.main([str(tmp_path), "--attacks", "badnet", "--modes", "nope"])
