"""Hostile and faulty input to the analysis commands (utils.results, utils.plots, utils.robustness_table):
every mistake is one `error:` line and exit 2, nothing on disk changes, nothing is half-written, and
figures go beside their data (never into the working folder) unless --out says otherwise.

Most cases call the entry points in-process through run_cli (the same path `python -m` takes, without a
second interpreter's start-up); one subprocess per command checks the real command line."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, run_in_process
from tests.test_plots import _check_png, _fake_record
from tests.test_results import add_purify, add_retune, make_record
from utils.analysis import plots, results
from utils.record.layout import record_name
from utils.robustness import table as robustness_table

pytest.importorskip("matplotlib")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cli(main, argv, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of an entry point run as `python -m` runs it."""
    return run_in_process(main, argv, capsys)


def _assert_one_error(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture()
def small_root(tmp_path):
    """Two seeds of one badnet record with an FST purification (and a retune), as sweeps lay them out."""
    root = tmp_path / "root"
    for seed in (0, 1):
        rec = make_record(root, "badnet", 0.1, seed, (0.9, 0.95 - 0.01 * seed, 0.02))
        add_purify(rec, "fst", (0.86, 0.02, 0.7), tune_seed=seed)
        add_retune(rec, "fst", (0.85, 0.3, 0.4), seed=seed)
    return root


# --- utils.results: output paths ------------------------------------------------------------------

def test_results_bad_output_paths_write_nothing(small_root, tmp_path, capsys):
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "keep.csv").write_text("precious\n")
    a_file = outdir / "plain"
    a_file.write_text("x")
    before = _snapshot(tmp_path)
    cases = [
        (["--csv", outdir], "is a folder"),  # was: IsADirectoryError traceback, after the table was printed
        (["--markdown", outdir / "t.md", "--csv", outdir / "t.md"], "both name"),
        (["--csv", outdir / "new.csv", "--summary_csv", a_file / "s.csv"], "is a file, not a folder"),
        (["--json", a_file / "deeper" / "x.json"], "is a file, not a folder"),
        (["--summary_csv", ""], "is a folder"),
    ]
    for extra, message in cases:
        code, out, err = _cli(results.main, [small_root, *extra], capsys)
        _assert_one_error(code, err, message)
        assert out == ""  # refused before the table was printed
        assert _snapshot(tmp_path) == before, extra  # in particular new.csv was not written next to the bad one
    code, _, err = _cli(results.main, [small_root / "seed_0" / "fmnist" / "badnet" / record_name(0.1, 0, "smallcnn") /
                                       "summary.json"], capsys)
    _assert_one_error(code, err, "is not a folder")


def test_results_prints_where_it_wrote(small_root, tmp_path, capsys):
    code, out, err = _cli(results.main, [small_root, "--csv", tmp_path / "o" / "a.csv", "--json", tmp_path / "o" / "a.json"],
                          capsys)
    assert code == 0 and "| FST |" in out
    assert f"wrote {tmp_path / 'o' / 'a.csv'}" in err and f"wrote {tmp_path / 'o' / 'a.json'}" in err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.csv", "a.json"]  # no temporary left behind


# --- utils.plots: empty and malformed input -----------------------------------------------------

def _bad_metrics(record: Path, kind: str) -> None:
    path = record / "metrics.csv"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "header only":
        path.write_text("epoch,clean_acc,asr,ra\n")
    elif kind == "no metric columns":
        path.write_text("epoch,lr\n1,0.1\n2,0.1\n")
    elif kind == "no epoch column":
        path.write_text("clean_acc,asr\n0.5,0.5\n")
    elif kind == "never evaluated":
        path.write_text("epoch,clean_acc,asr,ra\n1,,,\n2,nan,nan,nan\n")
    elif kind == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00garbage")
    elif kind == "folder":
        path.unlink()
        path.mkdir()


@pytest.mark.parametrize("kind, message", [
    ("empty", "is empty"), ("header only", "no rows"), ("no metric columns", "none of the columns clean_acc, asr, ra"),
    ("no epoch column", "lacks the column(s) epoch"), ("never evaluated", "no evaluated epoch"),
    ("binary", "not a readable"), ("folder", "is not a record folder"),
])
def test_curves_refuses_bad_victim_metrics(tmp_path, capsys, kind, message):
    record = _fake_record(tmp_path / "rec")
    _bad_metrics(record, kind)
    before = _snapshot(tmp_path)
    code, _, err = _cli(plots.main, ["curves", record], capsys)  # was: an empty PNG and exit 0 (empty file)
    _assert_one_error(code, err, message)
    assert _snapshot(tmp_path) == before and not (record / "figures").exists()


def test_curves_warns_of_a_metric_column_without_numbers(tmp_path, capsys):
    record = _fake_record(tmp_path / "rec")
    ft = record / "defense" / "ft" / "metrics.csv"
    ft.write_text("epoch,clean_acc,asr,ra\n1,0.9,junk,0.1\n2,0.91,,0.2\n")
    code, out, err = _cli(plots.main, ["curves", record, "--out", tmp_path / "c.png"], capsys)
    assert code == 0 and (tmp_path / "c.png").is_file()
    assert err.strip().splitlines() == [f"warning: {ft}: no number in the asr column; the asr panel leaves this run out"]


def test_curves_refuses_bad_purification_files(tmp_path, capsys):
    record = _fake_record(tmp_path / "rec")
    ft = record / "defense" / "ft"
    for payload, message in (("[1, 2]", "holds a JSON list, not an object"), ('{"before": 3}', "`before` is not an object"),
                             ('{"before": {"clean_', "not valid JSON")):
        (ft / "result.json").write_text(payload)
        before = _snapshot(tmp_path)
        code, _, err = _cli(plots.main, ["curves", record, "--out", tmp_path / "c.png"], capsys)
        _assert_one_error(code, err, str(ft / "result.json"), message)
        assert _snapshot(tmp_path) == before
    (ft / "result.json").unlink()
    _bad_metrics(ft, "header only")
    code, _, err = _cli(plots.main, ["curves", record, "--out", tmp_path / "c.png"], capsys)
    _assert_one_error(code, err, str(ft / "metrics.csv"), "no rows")
    assert not (tmp_path / "c.png").exists()


def test_pratio_refuses_bad_csv_and_empty_roots(tmp_path, capsys):
    cases = {"empty.csv": ("", "is empty"), "header.csv": (",".join(results.COLUMNS) + "\n", "no rows"),
             "other.csv": ("epoch,clean_acc\n1,0.5\n", "lacks the column(s) kind, dataset")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        code, _, err = _cli(plots.main, ["pratio", "--csv", tmp_path / name], capsys)
        _assert_one_error(code, err, message)
    empty_root = tmp_path / "nothing"
    empty_root.mkdir()
    for argv, message in ((["pratio", empty_root], "no results under"), (["pratio", tmp_path / "missing"], "does not exist"),
                          (["pratio"], "needs a record root or --csv"),
                          (["pratio", empty_root, "--csv", tmp_path / "empty.csv"], "one of them")):
        code, _, err = _cli(plots.main, argv, capsys)
        _assert_one_error(code, err, message)
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("figures"))


def test_plots_bad_out_paths(small_root, tmp_path, capsys):
    record = _fake_record(tmp_path / "rec")
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "file").write_text("x")
    before = _snapshot(tmp_path)
    for argv, message in ((["curves", record, "--out", tmp_path / "dir.png"], "is a folder"),
                          (["curves", record, "--out", tmp_path / "c.jpg"], "must name a .png"),
                          (["curves", record, "--out", tmp_path / "file" / "c.png"], "cannot write"),
                          (["pratio", small_root, "--out", tmp_path / "file"], "is a file"),
                          (["tsne", record, "--out", tmp_path / "t.txt"], "must name a .png"),
                          (["tsne", tmp_path / "file", "--modes", "ft"], "model.pt does not exist")):
        code, _, err = _cli(plots.main, argv, capsys)
        _assert_one_error(code, err, message)
        assert _snapshot(tmp_path) == before, argv


# --- default output places and the figures' content ---------------------------------------------

def test_figures_go_beside_their_data(small_root, tmp_path, capsys, monkeypatch):
    """Without --out nothing lands in the working folder: curves in <record>/figures/, pratio in
    <root>/figures/ (or figures/ beside the CSV); each command says where it wrote."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    record = _fake_record(tmp_path / "rec")
    (record / "defense" / "ft" / "result.json").write_text(json.dumps({"before": {"clean_acc": 0.7, "asr": 0.9, "ra": 0.1}}))
    code, out, err = _cli(plots.main, ["curves", record], capsys)
    assert code == 0, err
    assert out.strip() == f"wrote {record / 'figures' / 'curves.png'}"
    _check_png(record / "figures" / "curves.png", min_w=1200)
    code, out, _ = _cli(plots.main, ["curves", record, "--tag", "other"], capsys)
    assert code == 0 and out.strip().endswith("figures/curves_other.png")
    code, out, _ = _cli(plots.main, ["pratio", small_root], capsys)
    assert code == 0 and out.strip() == f"wrote {small_root / 'figures' / 'pratio_fmnist_smallcnn_badnet.png'}"
    _check_png(small_root / "figures" / "pratio_fmnist_smallcnn_badnet.png", min_w=800)
    results.main([str(small_root), "--csv", str(tmp_path / "csvdir" / "all.csv")])
    code, out, _ = _cli(plots.main, ["pratio", "--csv", tmp_path / "csvdir" / "all.csv"], capsys)
    assert code == 0 and out.strip().endswith("csvdir/figures/pratio_fmnist_smallcnn_badnet.png")
    assert list(work.iterdir()) == []
    # a figures/ folder inside a record does not disturb the result tables
    assert results.collect(small_root)[1] == []


def test_curves_start_at_the_victims_values(tmp_path):
    """Epoch 0 of each purification line is the model before purification: result.json's `before`,
    else the record's summary.json."""
    record = _fake_record(tmp_path / "rec")
    (record / "defense" / "ft" / "result.json").write_text(json.dumps({"before": {"clean_acc": 0.7, "asr": 0.9, "ra": 0.1}}))
    (record / "summary.json").write_text(json.dumps({"clean_acc": 0.6, "asr": 0.8, "ra": 0.2}))
    assert plots._before(record / "defense" / "ft", record) == pytest.approx({"clean_acc": 70.0, "asr": 90.0, "ra": 10.0})
    assert plots._before(record / "defense" / "fst", record) == pytest.approx({"clean_acc": 60.0, "asr": 80.0, "ra": 20.0})
    (record / "summary.json").unlink()
    assert plots._before(record / "defense" / "fst", record) is None
    # the fitted C-Acc axis: a 2-point accuracy cost spans most of the panel, not 2 % of it
    lo, hi = plots._data_limits([80.0, 78.0])
    assert hi - lo < 10 and lo < 78.0 and hi > 80.0
    assert plots._data_limits([]) == (-3, 103)


def test_pratio_counts_replicates_and_splits_recipes(tmp_path):
    root = tmp_path / "root"
    for seed in (0, 1):
        add_purify(make_record(root / "sweep", "badnet", 0.1, seed, epochs=1), "fst", (0.8, 0.1, 0.5), tune_seed=seed)
    add_purify(make_record(root / "quick", "badnet", 0.1, 0, epochs=3), "fst", (0.9, 0.0, 0.6))
    rows = results.collect(root)[0]
    series = plots.pratio_summary(rows)[("fmnist", "smallcnn", "badnet")]
    assert set(series) == {"fst | epochs=1", "fst | epochs=3", "No defense | epochs=1", "No defense | epochs=3"}
    assert series["fst | epochs=1"][0.1]["clean_acc"][2] == 2 and series["fst | epochs=3"][0.1]["clean_acc"][2] == 1
    assert plots._series_label("fst | epochs=3") == "FST (epochs=3)"
    # a CSV written before recipes existed: one series per mode, as before
    old = [{k: v for k, v in r.items() if k != "recipe"} for r in rows]
    assert set(plots.pratio_summary(old)[("fmnist", "smallcnn", "badnet")]) == {"fst", plots.NO_DEFENSE}
    _check_png(plots.plot_vs_pratio(rows, tmp_path / "figs")[0], min_w=800)


def test_tsne_class_names():
    assert plots.class_names("cifar10", 10)[0] == "0 airplane"
    assert plots.class_names("fmnist", 10)[9] == "9 ankle boot"
    assert plots.class_names("gtsrb", 43)[42] == "class 42"
    assert plots.tsne_figure_name(["ft", "fst"]) == "tsne_ft-fst.png"


# --- utils.robustness_table -----------------------------------------------------------------------

def test_robustness_table_errors_and_unusable_files(tmp_path, capsys):
    code, _, err = _cli(robustness_table.main, [tmp_path / "missing"], capsys)
    _assert_one_error(code, err, "does not exist")
    (tmp_path / "empty").mkdir()
    code, _, err = _cli(robustness_table.main, [tmp_path / "empty", "--dataset", "cifar10"], capsys)
    _assert_one_error(code, err, "no record under", "records there: none")
    rec = tmp_path / "r" / "fmnist" / "badnet" / record_name(0.1, 0, "smallcnn")
    for sub, text in (("defense/fst", "[1]"), ("defense/ft", '{"after": {"clean_acc": "x"}}'), ("retune", '"just text"'),
                      ("defense/pam", '{"after": {"clean_acc": 0.9, "asr": 0.05}}'), ("defense/pam/qra", '{"after": 3}'),
                      ("defense/pam/retune", '{"after": {"clean_acc": 0.8, "asr": 0.4}, "tuning": [], "poison_num": "5"}')):
        (rec / sub).mkdir(parents=True, exist_ok=True)
        (rec / sub / "result.json").write_text(text)
    code, out, err = _cli(robustness_table.main, [tmp_path / "r", "--attacks", "badnet", "--qra"], capsys)
    assert code == 0 and err == "", err  # was: TypeError / KeyError tracebacks
    lines = out.splitlines()
    assert "| FST | - | - | - | - | - | - |" in lines and "| FT | - | - | - | - | - | - |" in lines
    assert "| PAM | 90.00 | 5.00 | 80.00 | 40.00 | - | - |" in lines


def test_robustness_table_names_differing_victims_and_retuning_settings(tmp_path):
    import yaml

    root = tmp_path / "r"
    metrics = {"clean_acc": 0.9, "asr": 0.1, "ra": 0.8}
    for pratio, epochs in ((0.1, 1), (0.0, 3)):
        rec = root / "fmnist" / "badnet" / record_name(pratio, 0, "smallcnn")
        rec.mkdir(parents=True)
        (rec / "config.yaml").write_text(yaml.safe_dump({"attack": "badnet", "pratio": pratio, "epochs": epochs,
                                                         "random_seed": 0, "device": "cpu"}))
        (rec / "retune").mkdir()
        (rec / "retune" / "result.json").write_text(json.dumps({
            "before": metrics, "after": metrics, "poison_num": 5,
            "args": {"epochs": 5 + epochs, "defense_type": "none", "random_seed": None}}))
    table = robustness_table.markdown(root, "fmnist", "smallcnn", ["badnet"])
    assert "Victims differ (badnet): clean model: epochs=3; backdoored: epochs=1" in table
    assert "Retuning settings differ (badnet): clean model: ra.epochs=8; no defense: ra.epochs=6" in table


# --- the real command lines ---------------------------------------------------------------------

def test_command_lines(small_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    record = _fake_record(tmp_path / "rec")
    (record / "metrics.csv").write_bytes(b"")
    before = _snapshot(tmp_path)
    for argv, message in ((["utils.plots", "curves", record], "is empty"),
                          (["utils.results", small_root, "--csv", tmp_path], "is a folder"),
                          (["utils.robustness_table", tmp_path / "missing"], "does not exist")):
        done = subprocess.run([sys.executable, "-m", *map(str, argv)], cwd=REPO_ROOT, capture_output=True, text=True,
                              env=env, timeout=120)
        _assert_one_error(done.returncode, done.stderr, message)
    assert _snapshot(tmp_path) == before


def test_a_config_yaml_with_aliases_is_unusable_not_expanded(tmp_path):
    """The tables and figures read record config.yaml files through the bounded reader: a record
    whose config.yaml is a billion-laughs bomb is reported as unusable, never expanded."""
    from utils.analysis.results import _Unusable, _load

    bomb = tmp_path / "config.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n")
    with pytest.raises(_Unusable, match="alias"):
        _load(bomb, "yaml")
