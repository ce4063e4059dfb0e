"""utils/analysis/tsne.py (our own exact t-SNE) and utils/analysis/plots.py (pratio sweeps, training curves, feature
t-SNE): figures are checked to open, have a sensible size and not be blank; the numbers behind them
(replicate means, the separation score, the evaluated epochs) are checked directly."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import copy_record
from tests.test_results import add_purify, add_retune, make_record
from utils.analysis import plots, results
from utils.errors import UserError
from utils.record.store import clean_state_dict, load_record, save_torch
from utils.analysis.tsne import knn_separation, knn_vote, tsne

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

COLUMNS = ("kind dataset model attack pratio target seed mode tag tune_seed clean_acc asr ra before_clean_acc before_asr "
           "before_ra der epochs seconds record path").split()


def _check_png(path: Path, min_w: int = 400, min_h: int = 200) -> None:
    assert path.is_file() and path.suffix == ".png"
    with PIL.open(path) as img:
        img.load()
        w, h = img.size
        pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
    assert w >= min_w and h >= min_h, (w, h)
    assert pixels.std() > 0  # not blank
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write left no temporary behind


# --- t-SNE ---------------------------------------------------------------------------------------

def _blobs(n: int = 200, d: int = 20, gap: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = (torch.arange(n) >= n // 2).long()
    x = torch.randn(n, d, generator=g) + gap * labels[:, None].float() / d ** 0.5 * torch.ones(d)
    return x, labels


def test_tsne_keeps_blobs_apart_and_is_deterministic():
    x, labels = _blobs()
    y = tsne(x, seed=0)
    assert y.shape == (200, 2) and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert knn_separation(y, labels, k=5) > 0.95
    assert torch.equal(y, tsne(x, seed=0))
    assert not torch.equal(y, tsne(x, seed=1))  # the seed enters (the init's jitter)
    assert tsne(x[:30], dim=3, iterations=50).shape == (30, 3)  # perplexity 30 lowered to fit 30 points
    with pytest.raises(UserError):
        tsne(x[:3])


def test_knn_separation_score():
    mixed = torch.zeros(10, 2)
    mixed[:, 0] = torch.arange(10.0)
    alternating = torch.arange(10) % 2  # every neighbour of a point has the other label
    assert knn_separation(mixed, alternating, k=1) == 0.0
    apart = (torch.arange(10) >= 5).long()
    assert knn_separation(mixed, apart, k=1) == 1.0
    # majority class of the k nearest reference rows
    ref = torch.tensor([[0.0], [0.1], [0.2], [5.0], [5.1]])
    assert knn_vote(ref, torch.tensor([2, 2, 1, 1, 1]), torch.tensor([[0.05], [4.0]]), k=3).tolist() == [2, 1]


# --- metrics vs pratio ---------------------------------------------------------------------------

def _row(kind, attack, pratio, seed, mode, asr, acc, tag="", tune_seed=""):
    row = dict.fromkeys(COLUMNS, "")
    row.update(kind=kind, dataset="cifar10", model="resnet18", attack=attack, pratio=pratio, target=0, seed=seed,
               mode=mode, tag=tag, tune_seed=tune_seed, asr=asr, clean_acc=acc, ra=0.1)
    return row


def _write_long_csv(path: Path) -> Path:
    rows = []
    for attack in ("badnet", "blended"):
        for pratio in (0.01, 0.05, 0.1):
            for seed in (0, 1):
                rows.append(_row("attack", attack, pratio, seed, "none", 0.9 + 0.05 * seed, 0.9))
                for i, mode in enumerate(("ft", "lp", "fst")):
                    rows.append(_row("purify", attack, pratio, seed, mode, 0.5 - 0.2 * i + 0.1 * seed, 0.85, tune_seed=0))
        rows.append(_row("purify", attack, 0.1, 0, "ft", 0.0, 0.0, tag="x"))  # tagged: not drawn
        rows.append(_row("retune", attack, 0.1, 0, "fst", 1.0, 0.0))  # another kind: not drawn
        rows.append(_row("attack", attack, 0.0, 0, "none", 0.1, 0.9))  # pratio 0: no place on a log axis
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_pratio_summary_means_and_stds(tmp_path):
    rows = plots.read_csv_rows(_write_long_csv(tmp_path / "results.csv"))
    summary = plots.pratio_summary(rows)
    assert list(summary) == [("cifar10", "resnet18", "badnet"), ("cifar10", "resnet18", "blended")]
    series = summary[("cifar10", "resnet18", "badnet")]
    assert set(series) == {"ft", "lp", "fst", plots.NO_DEFENSE}
    assert list(series["ft"]) == [0.01, 0.05, 0.1]
    mean, std, n = series["ft"][0.1]["asr"]  # 50 % and 60 %: the tagged 0 % row is ignored
    assert n == 2 and mean == pytest.approx(55.0) and std == pytest.approx(np.std([50, 60], ddof=1))
    assert series[plots.NO_DEFENSE][0.05]["asr"][:2] == pytest.approx((92.5, np.std([90, 95], ddof=1)))
    assert set(plots.pratio_summary(rows, modes=["fst"])[("cifar10", "resnet18", "blended")]) == {"fst", plots.NO_DEFENSE}
    assert list(plots.pratio_summary(rows, attacks=["blended"])) == [("cifar10", "resnet18", "blended")]


def test_plot_vs_pratio_one_png_per_attack(tmp_path):
    csv_path = _write_long_csv(tmp_path / "results.csv")
    written = plots.plot_vs_pratio(plots.read_csv_rows(csv_path), tmp_path / "figs")
    assert sorted(p.name for p in written) == ["pratio_cifar10_resnet18_badnet.png", "pratio_cifar10_resnet18_blended.png"]
    for path in written:
        _check_png(path, min_w=800)
    # the CLI, with filters
    out = plots.main(["pratio", "--csv", str(csv_path), "--out", str(tmp_path / "cli"), "--attacks", "blended",
                      "--modes", "ft", "fst"])
    assert [p.name for p in out] == ["pratio_cifar10_resnet18_blended.png"]
    _check_png(out[0])
    with pytest.raises(UserError, match="no untagged"):
        plots.plot_vs_pratio(plots.read_csv_rows(csv_path), tmp_path / "none", datasets=["gtsrb"])


# --- training curves ----------------------------------------------------------------------------

def _write_metrics(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _fake_record(root: Path) -> Path:
    folder = root / "cifar10" / "badnet" / "pratio_0.1-target_0-archi_smallcnn"
    _write_metrics(folder / "metrics.csv", [{"epoch": e, "lr": 0.01, "train_loss": 1 / e, "train_acc": 0.5,
                                             "clean_acc": 0.5 + 0.05 * e, "asr": 0.2 * e, "ra": 0.1, "img_per_s": 100}
                                            for e in range(1, 5)])
    (folder / "config.yaml").write_text("dataset: cifar10\nmodel: smallcnn\nattack: badnet\npratio: 0.1\nattack_target: 0\n")
    tuned = [{"epoch": e, "lr": 0.01, "train_loss": 0.5, "train_acc": 0.8, "clean_acc": 0.8, "asr": 1 - 0.1 * e, "ra": 0.1 * e,
              "head_weight_norm": 1.0, "head_cosine_to_orig": 0.9} for e in range(1, 7)]
    _write_metrics(folder / "defense" / "ft" / "metrics.csv", tuned)
    sparse = [dict(r) for r in tuned]
    for r in sparse[:5]:  # --eval_every 3 style: no evaluation at epochs 1, 2, 4, 5 (empty cells and "nan")
        r.update(clean_acc="", asr="", ra="")
    sparse[3].update(clean_acc="nan", asr="nan", ra="nan")
    sparse[2].update(clean_acc=0.7, asr=0.05, ra=0.6)
    _write_metrics(folder / "defense" / "fst" / "metrics.csv", sparse)
    _write_metrics(folder / "defense" / "lp_other" / "metrics.csv", tuned)  # tagged: only with --tag other
    _write_metrics(folder / "defense" / ".fst.partial-abc" / "metrics.csv", tuned)  # staging folder: never read
    return folder


def test_plot_curves_from_metrics_files(tmp_path):
    folder = _fake_record(tmp_path / "record")
    assert [m for m, _ in plots._defense_runs(folder, None, "")] == ["ft", "fst"]
    assert [m for m, _ in plots._defense_runs(folder, None, "other")] == ["lp"]
    sparse = plots.read_csv_rows(folder / "defense" / "fst" / "metrics.csv")
    xs, ys = plots._points(sparse, "asr")  # only the evaluated epochs
    assert xs == [3.0, 6.0] and ys == pytest.approx([5.0, 40.0])
    out = plots.plot_curves(folder, tmp_path / "curves.png")
    _check_png(out, min_w=1200)
    out2 = plots.main(["curves", str(folder), "--out", str(tmp_path / "tagged.png"), "--tag", "other"])[0]
    _check_png(out2)
    with pytest.raises(UserError, match="lp"):
        plots.plot_curves(folder, tmp_path / "x.png", modes=["lp"])
    with pytest.raises(UserError, match="metrics.csv"):
        plots.plot_curves(tmp_path, tmp_path / "x.png")


# --- feature t-SNE on a real record ----------------------------------------------------------------

def test_plot_tsne_on_the_badnet_record(badnet_record, tiny_cifar10, tmp_path):
    folder = copy_record(badnet_record, tmp_path / "record")
    state = load_record(folder)["model"]
    g = torch.Generator().manual_seed(0)
    noisy = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}
    save_torch(folder / "defense" / "ft" / "model.pt", clean_state_dict(noisy))
    out = tmp_path / "figs" / "tsne.png"
    with pytest.raises(UserError, match=r"defense/fst/model\.pt.*--save true"):
        plots.plot_tsne(folder, out, modes=("ft", "fst"), n=40, dataset_path=tiny_cifar10)
    assert not out.exists()
    result = plots.plot_tsne(folder, out, modes=("ft",), n=40, dataset_path=tiny_cifar10, iterations=300)
    assert result == out
    _check_png(out)
    scores = json.loads(out.with_suffix(".json").read_text())
    assert [p["label"] for p in scores["panels"]] == ["Backdoored", "FT"]
    assert [p["model"] for p in scores["panels"]] == ["none", "ft"]
    for key in ("separation_5nn", "poisoned_nn_true_class", "poisoned_nn_target"):
        assert all(0.0 <= p[key] <= 1.0 for p in scores["panels"])
    assert scores["n_clean"] == 40 and scores["n_poisoned"] == 40


# --- matplotlib missing --------------------------------------------------------------------------

def test_missing_matplotlib_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match="pip install matplotlib"):
        plots.plot_curves(tmp_path, tmp_path / "x.png")
    with pytest.raises(UserError, match="pip install matplotlib"):
        plots.plot_vs_pratio([], tmp_path)


# --- O-ASR against P-ASR ---------------------------------------------------------------------------

def test_opasr_figure_from_a_record_root(tmp_path, capsys):
    root = tmp_path / "root"
    for seed in (0, 1):
        clean = make_record(root, "badnet", 0.0, seed, (0.92, 0.01, 0.9))
        add_retune(clean, "none", (0.91, 0.03, 0.88), before=(0.92, 0.01, 0.9), seed=seed)
        for attack in ("badnet", "blended"):
            rec = make_record(root, attack, 0.1, seed)
            add_retune(rec, "none", (0.88, 0.97, 0.02), before=(0.90, 0.99, 0.01), seed=seed)
            add_purify(rec, "fst", (0.85, 0.02, 0.7), tune_seed=seed)
            add_retune(rec, "fst", (0.84, 0.60 + 0.1 * seed, 0.3), before=(0.85, 0.02, 0.7), seed=seed)
            add_retune(rec, "fst", (0.80, 0.95, 0.03), before=(0.85, 0.02, 0.7), seed=seed, tag="p20")
            add_purify(rec, "pam", (0.86, 0.01, 0.8), tune_seed=seed, pam_rho=0.5)
            add_retune(rec, "pam", (0.85, 0.05, 0.8), before=(0.86, 0.01, 0.8), seed=seed)
    written = plots.main(["opasr", str(root)])
    png, js = root / "figures" / "opasr_fmnist_smallcnn.png", root / "figures" / "opasr_fmnist_smallcnn.json"
    assert written == [png, js] and capsys.readouterr().out.splitlines() == [f"wrote {png}", f"wrote {js}"]
    _check_png(png)
    points = json.loads(js.read_text())["points"]
    assert [p["label"] for p in points] == ["clean model · BadNet", "no defense · BadNet", "no defense · Blended",
                                           "FST · BadNet", "FST · Blended", "PAM · BadNet", "PAM · Blended"]
    fst = points[3]
    assert fst["o_asr"] == pytest.approx(2.0) and fst["p_asr"] == pytest.approx(65.0) and fst["n"] == 2
    assert fst["p_asr_std"] == pytest.approx(7.0710678) and len(fst["results"]) == 2
    assert points[0]["o_asr"] == pytest.approx(1.0) and points[0]["role"] == "clean"
    # the RA tag p20, only FST: the references stay
    written = plots.main(["opasr", str(root), "--retune_tag", "p20", "--out", str(tmp_path / "f")])
    assert [p.name for p in written] == ["opasr_fmnist_smallcnn_p20.png", "opasr_fmnist_smallcnn_p20.json"]
    points = json.loads(written[1].read_text())["points"]
    assert [p["label"] for p in points] == ["FST · BadNet", "FST · Blended"] and points[0]["p_asr"] == pytest.approx(95.0)
    assert [p["role"] for p in plots.opasr_summary(results_rows(root), modes=["pam"])[("fmnist", "smallcnn")]] == \
        ["clean", "backdoored", "backdoored", "defense", "defense"]
    with pytest.raises(UserError, match=r"no retuning results \(retune_x/result.json"):
        plots.main(["opasr", str(root), "--retune_tag", "x"])
    with pytest.raises(UserError, match="is a file"):
        plots.main(["opasr", str(root), "--out", str(png)])

    # a second victim recipe of the same cell: its own point, named by what differs, never averaged
    other = make_record(root / "quick", "badnet", 0.1, 7, epochs=9)
    add_purify(other, "fst", (0.85, 0.02, 0.7), tune_seed=0)
    add_retune(other, "fst", (0.84, 0.20, 0.3), before=(0.85, 0.10, 0.7), seed=0)
    fst = [p for p in plots.opasr_summary(results_rows(root))[("fmnist", "smallcnn")] if p["label"].startswith("FST · BadNet")]
    assert [(p["label"], p["n"], p["p_asr"]) for p in fst] == [("FST · BadNet (epochs=3)", 2, pytest.approx(65.0)),
                                                               ("FST · BadNet (epochs=9)", 1, pytest.approx(20.0))]


def results_rows(root: Path) -> list[dict]:
    return results.collect(root)[0]


def test_opasr_colours_stay_distinct_for_the_eleven_defenses_of_the_2024_comparison():
    names = ["ep", "anp", "i-bau", "nad", "fp", "clp", "nc", "ft-sam", "fst", "bti", "pam"]
    colours = plots._distinct_colours(names)
    assert len(set(colours.values())) == len(names)
    greys = {c for c in colours.values() if max(c) - min(c) < 0.05}
    assert not greys  # grey and black belong to the clean and the unpurified reference points
    assert len(set(plots._distinct_colours(names[:4]).values())) == 4
