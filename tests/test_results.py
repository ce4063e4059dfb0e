"""utils/analysis/results.py on fabricated record trees: collection, warnings, summaries, filters, tables, CSV, CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT
from utils.analysis import results
from utils.errors import UserError
from utils.record.layout import record_name


# --- helpers that fabricate result files ---------------------------------------------------------

def _json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _m(clean_acc, asr, ra):
    return {"clean_acc": clean_acc, "asr": asr, "ra": ra}


def make_record(root: Path, attack="badnet", pratio=0.1, seed=0, metrics=(0.9, 0.99, 0.01), dataset="fmnist",
                model="smallcnn", summary=True, **settings) -> Path:
    """A victim record as the attack scripts lay it out, under root/seed_<seed>/; `settings` go into its config.yaml."""
    folder = root / f"seed_{seed}" / dataset / attack / record_name(pratio, 0, model)
    folder.mkdir(parents=True)
    config = {"dataset": dataset, "model": model, "epochs": 3, "random_seed": seed, "pratio": pratio, "attack_target": 0,
              "attack": attack, "device": f"cuda:{seed}", "record_root": f"root_{seed}", **settings}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if summary:
        _json(folder / "summary.json", {**_m(*metrics), "epochs": 3, "seconds": 10.0})
    return folder


def add_purify(record: Path, mode: str, after, before=(0.9, 0.99, 0.01), der=0.9, tune_seed=0, tag="", epochs=10,
               **settings) -> Path:
    name = f"{mode}_{tag}" if tag else mode
    return _json(record / "defense" / name / "result.json", {
        "ft_mode": mode, "before": _m(*before), "after": _m(*after), "der": der, "seconds": 5.0,
        "args": {"random_seed": tune_seed, "epochs": epochs, "split_ratio": 0.02, "ft_mode": mode, "tag": tag,
                 "progress": tune_seed == 0, "pam_rho": 0.5 + tune_seed, **settings}})


def add_retune(record: Path, defense: str, after, before=(0.85, 0.0, 0.5), seed=0, tag="") -> Path:
    base = record if defense == "none" else record / "defense" / defense
    return _json(base / (f"retune_{tag}" if tag else "retune") / "result.json", {
        "attack": "retune", "defense_type": defense, "before": _m(*before), "after": _m(*after), "seed": seed,
        "seconds": 4.0, "args": {"epochs": 5}})


def add_qra(record: Path, defense: str, after, before=(0.85, 0.0, 0.5), seed=0) -> Path:
    return _json(record / "defense" / defense / "qra" / "result.json", {
        "defense_type": defense, "settings": {"seed": seed}, "before": {"purified": _m(*before), "clean": _m(0.8, 0, 0)},
        "after": {"purified": _m(*after), "clean": _m(0.8, 0.1, 0.7)}, "seconds": 3.0, "args": {"epochs": 50}})


# purification results of the sweep: (attack, pratio, mode) -> (after metrics of seed 0, of seed 1)
AFTER = {
    "ft": ((0.80, 0.90, 0.10), (0.84, 0.94, 0.06)),
    "lp": ((0.82, 0.95, 0.05), None),  # seed 1 lacks lp
    "fst": ((0.78, 0.02, 0.70), (0.80, 0.00, 0.74)),
    "ft-sam": ((0.83, 0.50, 0.40), (0.85, 0.40, 0.50)),
}


@pytest.fixture()
def sweep(tmp_path):
    """2 seeds x 2 attacks x 2 pratios, modes ft/lp/fst/ft-sam (lp missing for seed 1)."""
    root = tmp_path / "sweep"
    for seed in (0, 1):
        for attack in ("blended", "badnet"):
            for pratio in (0.1, 0.01):
                rec = make_record(root, attack, pratio, seed, (0.90 + 0.02 * seed, 0.99 - 0.01 * seed, 0.01))
                for mode, pair in AFTER.items():
                    if pair[seed] is not None:
                        add_purify(rec, mode, pair[seed], der=0.5 + 0.1 * seed, tune_seed=seed)
    return root


def _table_lines(markdown: str, heading: str) -> list[str]:
    block = markdown.split(heading, 1)[1].split("###", 1)[0]
    return [line for line in block.splitlines() if line.startswith("|")]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip("|").split("|")]


# --- tests --------------------------------------------------------------------------------------

def test_sweep_summary_and_table(sweep):
    rows, warnings = results.collect(sweep)
    assert warnings == []
    assert len(rows) == 2 * 2 * 2 * (1 + 4) - 4  # attack rows + purify rows, lp missing for seed 1
    assert rows == results.collect(sweep)[0]  # deterministic order
    assert rows[0]["kind"] == "attack" and rows[0]["path"].startswith("seed_0/")

    summary = results.summarize(rows)
    fst = [s for s in summary if s["mode"] == "fst" and s["attack"] == "badnet" and math.isclose(s["pratio"], 0.1)]
    assert len(fst) == 1 and fst[0]["n"] == 2
    assert fst[0]["clean_acc_mean"] == pytest.approx(0.79)
    assert fst[0]["clean_acc_std"] == pytest.approx(math.sqrt(2 * 0.01 ** 2))  # ddof=1
    assert fst[0]["asr_mean"] == pytest.approx(0.01) and fst[0]["ra_mean"] == pytest.approx(0.72)
    assert fst[0]["der_mean"] == pytest.approx(0.55) and fst[0]["der_std"] == pytest.approx(math.sqrt(0.005))
    lp = [s for s in summary if s["mode"] == "lp" and s["attack"] == "blended" and math.isclose(s["pratio"], 0.01)]
    assert lp[0]["n"] == 1 and lp[0]["clean_acc_std"] == 0.0
    none = [s for s in summary if s["kind"] == "attack" and s["attack"] == "badnet" and math.isclose(s["pratio"], 0.01)]
    assert none[0]["mode"] == "none" and none[0]["clean_acc_mean"] == pytest.approx(0.91) and none[0]["der_mean"] is None

    md = results.purification_tables(rows)
    assert md.count("### ") == 2
    lines = _table_lines(md, "### fmnist / smallcnn / pratio 0.1 (2 seeds)")
    header = _cells(lines[0])
    assert header[:5] == ["Defense", "BadNet C-Acc", "BadNet ASR", "BadNet RA", "BadNet DER"]  # attacks alphabetical
    assert header[5:] == ["Blended C-Acc", "Blended ASR", "Blended RA", "Blended DER"]
    body = {_cells(line)[0]: _cells(line)[1:] for line in lines[2:]}
    assert [_cells(line)[0] for line in lines[2:]] == ["No defense", "FT", "LP", "FST", "FT-SAM"]
    assert body["FST"][0] == "79.00 ± 1.41" and body["FST"][1] == "**1.00 ± 1.41**"  # lowest defended ASR in bold
    assert body["FST"][3] == "55.00 ± 7.07"
    assert body["No defense"][0] == "91.00 ± 1.41" and body["No defense"][3] == ""
    assert body["LP"][0] == "82.00 ± 0.00 (n=1)" and "(n=" not in body["FT"][0]
    # the given attack order wins
    md2 = results.purification_tables(rows, attacks=["blended", "badnet"])
    assert _cells(_table_lines(md2, "pratio 0.01")[0])[1] == "Blended C-Acc"


def test_missing_and_partial_files(sweep):
    rec = sweep / "seed_0" / "fmnist" / "badnet" / record_name(0.1, 0, "smallcnn")
    (rec / "defense" / "ft" / "result.json").write_text('{"ft_mode": "ft", "before": {"clean_acc": 0.9')  # truncated
    broken = add_purify(rec, "fst", (0.8, 0.0, 0.7))
    data = json.loads(broken.read_text())
    del data["after"]
    broken.write_text(json.dumps(data))
    _json(rec / "defense" / ".fst.partial-xyz" / "result.json", {"half": "written"})  # staging: ignored
    _json(rec / "defense" / "fst" / ".retune.partial-abc" / "result.json", {})
    running = make_record(sweep, "sig", 0.1, 0, summary=False)
    add_purify(running, "ft", (0.8, 0.9, 0.1))  # not read: the attack has no summary yet
    rows, warnings = results.collect(sweep)
    assert len(rows) == 36 - 2
    assert len(warnings) == 3, warnings
    text = "\n".join(warnings)
    assert "defense/ft/result.json: not valid JSON" in text
    assert "defense/fst/result.json: missing key after.clean_acc" in text
    assert f"{running}: config.yaml but no summary.json" in text
    assert ".fst.partial" not in text and ".retune.partial" not in text
    assert not any(r["attack"] == "sig" for r in rows)
    assert not any(r["path"].startswith(rec.relative_to(sweep).as_posix() + "/defense/f") and r["pratio"] == 0.1
                   and r["seed"] == 0 and r["attack"] == "badnet" and r["mode"] in ("ft", "fst") for r in rows)
    with pytest.raises(UserError, match="does not exist"):
        results.collect(sweep / "nope")


def test_filters_and_tags(sweep):
    rec = sweep / "seed_0" / "fmnist" / "badnet" / record_name(0.01, 0, "smallcnn")
    add_purify(rec, "fst", (0.5, 0.5, 0.5), tag="a1")
    other = make_record(sweep, "badnet", 0.01, 0, model="resnet18")
    add_purify(other, "fst", (0.7, 0.1, 0.6))
    rows, _ = results.collect(sweep)
    tagged = [r for r in rows if r["tag"]]
    assert len(tagged) == 1 and tagged[0]["mode"] == "fst" and tagged[0]["tag"] == "a1"
    default = results.filter_rows(rows)
    assert tagged[0] not in default and len(default) == len(rows) - 1
    only_tag = results.filter_rows(rows, tags=("a1",))
    assert {r["kind"] for r in only_tag} == {"attack", "purify"}  # the baseline stays
    assert [r["tag"] for r in only_tag if r["kind"] == "purify"] == ["a1"]
    assert "FST [a1]" in results.purification_tables(results.filter_rows(rows, tags=None))
    sel = results.filter_rows(rows, datasets=["fmnist"], models=["smallcnn"], pratios=[0.01 + 1e-12], attacks=["badnet"])
    assert len(sel) == 2 + 7 and all(r["attack"] == "badnet" and r["model"] == "smallcnn" for r in sel)
    assert results.filter_rows(rows, pratios=[0.02]) == [] and results.filter_rows(rows, datasets=["cifar10"]) == []
    modes = results.filter_rows(rows, modes=["fst"])
    assert {r["mode"] for r in modes} == {"none", "fst"}
    assert {r["model"] for r in results.filter_rows(rows, models=["resnet18"])} == {"resnet18"}
    assert results.filter_rows(rows, kinds=["purify"], modes=["lp"], attacks=["blended"], pratios=[0.1])[0]["seed"] == 0


def test_retune_qra_and_robustness_table(tmp_path):
    root = tmp_path / "rob"
    for seed in (0, 1):
        rec = make_record(root, "badnet", 0.1, seed)
        add_purify(rec, "fst", (0.85, 0.0, 0.5), tune_seed=seed)
        add_retune(rec, "none", (0.88, 0.95 + 0.01 * seed, 0.02), seed=seed)
        add_retune(rec, "fst", (0.84, 0.10 + 0.10 * seed, 0.6), seed=seed)
        add_retune(rec, "fst", (0.83, 0.9, 0.05), seed=seed, tag="p20")
        add_qra(rec, "fst", (0.81, 0.02, 0.4), seed=seed)
    rows, warnings = results.collect(root)
    assert warnings == []
    retune = [r for r in rows if r["kind"] == "retune"]
    assert len(retune) == 6 and {(r["mode"], r["tag"]) for r in retune} == {("none", ""), ("fst", ""), ("fst", "p20")}
    r = next(r for r in retune if r["mode"] == "fst" and r["tag"] == "" and r["seed"] == 1)
    assert r["tune_seed"] == 1 and r["asr"] == pytest.approx(0.2) and r["before_ra"] == 0.5 and r["der"] is None
    assert r["epochs"] == 5 and r["path"].endswith("defense/fst/retune/result.json")
    qra = [r for r in rows if r["kind"] == "qra"]
    assert len(qra) == 2 and qra[0]["clean_acc"] == 0.81 and qra[0]["before_clean_acc"] == 0.85 and qra[0]["mode"] == "fst"
    assert qra[0]["epochs"] == 50
    md = results.robustness_tables(results.filter_rows(rows, tags=None))
    lines = _table_lines(md, "retuning attack (2 seeds)")
    assert _cells(lines[0]) == ["Defense", "BadNet C-Acc after RA", "BadNet ASR after RA"]
    body = [_cells(line) for line in lines[2:]]
    assert [b[0] for b in body] == ["No defense", "FST", "FST [p20]"]
    assert body[0][2] == "95.50 ± 0.71" and body[1][2] == "15.00 ± 7.07"
    assert results.robustness_tables([r for r in rows if r["kind"] != "retune"]) == ""
    full = results.markdown(results.filter_rows(rows))
    assert "## Purification" in full and "## Post-purification robustness" in full and "p20" not in full


def test_csv_round_trip(sweep, tmp_path):
    rows, _ = results.collect(sweep)
    rows[0]["tune_seed"] = None
    path = tmp_path / "out" / "long.csv"
    results.write_long_csv(rows, path)
    assert path.read_text().splitlines()[0] == ",".join(results.COLUMNS)
    back = results.read_long_csv(path)
    assert back == rows
    assert isinstance(back[1]["seed"], int) and isinstance(back[1]["pratio"], float) and back[0]["before_asr"] is None
    summary = results.summarize(rows)
    results.write_summary_csv(summary, tmp_path / "summary.csv")
    assert results.read_long_csv(tmp_path / "summary.csv") == summary


def test_cli(sweep, tmp_path, capsys):
    add_purify(sweep / "seed_0" / "fmnist" / "badnet" / record_name(0.1, 0, "smallcnn"), "fst", (0.1, 0.1, 0.1), tag="x")
    out = tmp_path / "cli"
    text = results.main([str(sweep), "--pratio", "0.1", "--attacks", "blended", "--modes", "fst", "--csv", str(out / "a.csv"),
                         "--summary_csv", str(out / "s.csv"), "--markdown", str(out / "t.md")])
    captured = capsys.readouterr()
    assert captured.out == text and (out / "t.md").read_text() == text
    assert "### fmnist / smallcnn / pratio 0.1 (2 seeds)" in text and "pratio 0.01" not in text and "BadNet" not in text
    assert [_cells(line)[0] for line in _table_lines(text, "pratio 0.1")[2:]] == ["No defense", "FST"]
    long = results.read_long_csv(out / "a.csv")
    assert len(long) == 4 and {r["mode"] for r in long} == {"none", "fst"} and {r["tag"] for r in long} == {""}
    assert len(results.read_long_csv(out / "s.csv")) == 2
    results.main([str(sweep), "--tag", "x", "--attacks", "badnet", "--pratio", "0.1"])
    assert "FST [x]" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        results.main([str(sweep), "--dataset", "cifar10"])
    assert exc.value.code == 1 and "error: no results under" in capsys.readouterr().err
    with pytest.raises(UserError):
        results.main([str(tmp_path / "missing")])


def test_cli_subprocess(sweep, tmp_path):
    (sweep / "seed_1" / "fmnist" / "badnet" / record_name(0.1, 0, "smallcnn") / "defense" / "ft" / "result.json").write_text("{")
    cmd = [sys.executable, "-m", "utils.results"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd + [str(sweep), "--csv", str(tmp_path / "x.csv")], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "| No defense |" in done.stdout and (tmp_path / "x.csv").is_file()
    assert done.stderr.startswith("warning: ") and "defense/ft/result.json: not valid JSON" in done.stderr
    done = subprocess.run(cmd + [str(tmp_path / "missing")], cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("error: record root") and "does not exist" in done.stderr


def test_runs_of_different_recipes_are_never_averaged(sweep, tmp_path):
    """The quickstart victim (3 epochs, 20k images) beside sweep victims (1 epoch, 2k images) of the same
    cell: two rows, each averaging only its own seeds, and a line naming what differs."""
    root = tmp_path / "mixed"
    for seed in (0, 1):
        rec = make_record(root / "sweep", "badnet", 0.1, seed, (0.80 + 0.02 * seed, 0.9, 0.1), epochs=1, train_subset=2000)
        add_purify(rec, "fst", (0.70, 0.02, 0.6), tune_seed=seed)
    quick = make_record(root / "quick", "badnet", 0.1, 0, (0.95, 1.0, 0.0), epochs=3, train_subset=20000)
    add_purify(quick, "fst", (0.93, 0.01, 0.8))
    add_purify(quick, "fst", (0.90, 0.00, 0.8), tag="long", epochs=40)
    rows, warnings = results.collect(root)
    assert warnings == []
    recipes = {r["recipe"] for r in rows if r["kind"] == "attack"}
    assert len(recipes) == 2
    recipe = results.recipe_of(next(r for r in rows if r["record"].startswith("quick")))
    assert recipe["epochs"] == 3 and recipe["train_subset"] == 20000
    assert not {"random_seed", "device", "record_root", "dataset", "pratio"} & set(recipe)  # seeds, places, cell keys: out
    fst = next(r for r in rows if r["kind"] == "purify" and r["tag"] == "long")
    assert results.recipe_of(fst)["ft.epochs"] == 40 and "ft.pam_rho" not in results.recipe_of(fst)  # another mode's setting
    assert "ft.progress" not in results.recipe_of(fst) and "ft.random_seed" not in results.recipe_of(fst)

    summary = [s for s in results.summarize(rows) if s["kind"] == "attack"]
    assert sorted((s["n"], round(s["clean_acc_mean"], 6)) for s in summary) == [(1, 0.95), (2, 0.81)]

    md = results.purification_tables(results.filter_rows(rows))
    lines = _table_lines(md, "### fmnist / smallcnn / pratio 0.1 (2 seeds)")
    names = [_cells(line)[0] for line in lines[2:]]
    assert names == ["No defense (epochs=1, train_subset=2000)", "No defense (epochs=3, train_subset=20000)",
                     "FST (epochs=1, train_subset=2000)", "FST (epochs=3, train_subset=20000)"]
    body = {_cells(line)[0]: _cells(line)[1:] for line in lines[2:]}
    assert body["No defense (epochs=1, train_subset=2000)"][0] == "81.00 ± 1.41"
    assert body["No defense (epochs=3, train_subset=20000)"][0] == "95.00 ± 0.00 (n=1)"
    assert "Recipes differ here, so rows are split by them and never averaged across: epochs (1, 3); " \
           "train_subset (2000, 20000)." in md
    # every tag: the tagged FST run has its own row anyway; its own ft.epochs only differs from nothing in its cell
    assert "FST [long] (epochs=3, train_subset=20000) |" in results.purification_tables(results.filter_rows(rows, tags=None))

    # one recipe (the sweep fixture): the old layout, no recipe names, no note
    plain = results.purification_tables(results.collect(sweep)[0])
    assert "Recipes differ" not in plain and "| FST |" in plain

    # the group key travels with the CSV, summary CSV and JSON outputs
    out = tmp_path / "out"
    results.main([str(root), "--csv", str(out / "a.csv"), "--summary_csv", str(out / "s.csv"), "--json", str(out / "a.json")])
    back = results.read_long_csv(out / "a.csv")
    assert {r["recipe"] for r in back} == {r["recipe"] for r in results.filter_rows(rows)}
    assert len({(s["mode"], s["recipe"]) for s in results.read_long_csv(out / "s.csv")}) == 4
    data = json.loads((out / "a.json").read_text())
    assert {s["recipe"]["epochs"] for s in data["summary"]} == {1, 3} and len(data["rows"]) == 6


def test_a_row_mixing_hardware_says_so(tmp_path):
    """The device and torch version are no part of the recipe (seeds on a CPU and on a GPU are still
    replicates), but a row whose replicates come from both is flagged under the table."""
    root = tmp_path / "hw"
    for seed, device, version in ((0, "cpu (x86_64, 2 threads)", "2.13.0+cpu"), (1, "cuda:0 (NVIDIA H200)", "2.13.0")):
        rec = make_record(root, "badnet", 0.1, seed)
        _json(rec / "summary.json", {**_m(0.9, 0.99, 0.01), "device": device, "versions": {"torch": version}})
        add_purify(rec, "fst", (0.8, 0.0, 0.7), tune_seed=seed)
    rows, _ = results.collect(root)
    assert {r["env"] for r in rows if r["kind"] == "attack"} == {"cpu, torch 2.13.0+cpu", "NVIDIA H200, torch 2.13.0"}
    md = results.purification_tables(rows)
    assert "| No defense | 90.00 ± 0.00 |" in md  # still one row of two replicates
    assert ("Replicates computed on different hardware or torch versions (not part of the recipe): No defense / BadNet "
            "(NVIDIA H200, torch 2.13.0; cpu, torch 2.13.0+cpu).") in md
    assert "FST / BadNet" not in md  # its results say nothing about where they ran


def test_layout_2024(tmp_path, capsys):
    """O-Backdoor, P-Backdoor, then O-/P-Robustness per defense; columns C-Acc and ASR per attack; an RA
    tag of its own; a second purification recipe splits the defense's rows (O- and P- paired), never averaged."""
    root = tmp_path / "r24"
    for seed in (0, 1):
        for attack in ("badnet", "blended"):
            rec = make_record(root, attack, 0.1, seed, (0.90, 0.99 - 0.01 * seed, 0.01))
            add_retune(rec, "none", (0.88, 0.97, 0.02), before=(0.90, 0.99, 0.01), seed=seed)
            add_purify(rec, "fst", (0.85, 0.02 + 0.02 * seed, 0.7), tune_seed=seed)
            add_retune(rec, "fst", (0.84, 0.60 + 0.1 * seed, 0.3), before=(0.85, 0.02, 0.7), seed=seed)
            add_retune(rec, "fst", (0.80, 0.95, 0.03), seed=seed, tag="p20")
            add_purify(rec, "ft", (0.87, 0.50, 0.4), tune_seed=seed)
            add_purify(rec, "pam", (0.86, 0.01, 0.8), tune_seed=seed, pam_rho=0.5)  # no RA: an O- row only
            add_purify(rec, "pam", (0.80, 0.30, 0.5), tune_seed=seed, tag="x", pam_rho=0.5)  # another tag: not shown by default
    rows, warnings = results.collect(root)
    assert warnings == []
    text = results.main([str(root), "--layout", "2024"])
    assert capsys.readouterr().out == text
    lines = _table_lines(text, "### fmnist / smallcnn / pratio 0.1 / NeurIPS 2024 layout (2 seeds)")
    assert _cells(lines[0]) == ["Defense", "Row", "BadNet C-Acc", "BadNet ASR", "Blended C-Acc", "Blended ASR"]
    body = [_cells(line) for line in lines[2:]]
    assert [b[:2] for b in body] == [["No defense", "O-Backdoor"], ["No defense", "P-Backdoor"], ["FT", "O-Robustness"],
                                     ["FST", "O-Robustness"], ["FST", "P-Robustness"], ["PAM", "O-Robustness"]]
    assert body[0][3] == "98.50 ± 0.71" and body[1][3] == "97.00 ± 0.00"
    assert body[3][3] == "3.00 ± 1.41" and body[4][3] == "65.00 ± 7.07" and body[4][2] == "84.00 ± 0.00"
    assert "p20" not in text and "[x]" not in text and "Recipes differ" not in text
    # the RA tag p20 instead; the defense tag x instead; --modes keeps the unpurified rows
    p20 = results.main([str(root), "--layout", "2024", "--retune_tag", "p20", "--modes", "fst"])
    body = [_cells(line) for line in _table_lines(p20, "2024 layout (2 seeds)")[2:]]
    assert [b[:2] for b in body] == [["No defense", "O-Backdoor"], ["FST", "O-Robustness"], ["FST", "P-Robustness"]]
    assert body[2][3] == "95.00 ± 0.00" and "RA, tag p20" in p20
    tagged = results.main([str(root), "--layout", "2024", "--tag", "x"])
    assert [_cells(line)[:2] for line in _table_lines(tagged, "2024 layout (2 seeds)")[2:]][-1] == ["PAM [x]", "O-Robustness"]
    capsys.readouterr()
    # a second FST recipe on one record: its O- and P- rows apart from the others', each pair together
    rec = make_record(root / "long", "badnet", 0.1, 5)
    add_purify(rec, "fst", (0.70, 0.00, 0.9), tune_seed=0, epochs=40)
    add_retune(rec, "fst", (0.69, 0.10, 0.8), seed=0)
    mixed = results.tables_2024(results.select_2024(results.collect(root)[0]))
    body = [_cells(line) for line in _table_lines(mixed, "2024 layout (")[2:]]
    fst = [b[:3] for b in body if b[0].startswith("FST")]
    assert fst == [["FST (ft.epochs=10)", "O-Robustness", "85.00 ± 0.00 (n=2)"],
                   ["FST (ft.epochs=10)", "P-Robustness", "84.00 ± 0.00 (n=2)"],
                   ["FST (ft.epochs=40)", "O-Robustness", "70.00 ± 0.00 (n=1)"],
                   ["FST (ft.epochs=40)", "P-Robustness", "69.00 ± 0.00 (n=1)"]]
    assert "Recipes differ here" in mixed and "ft.epochs (10, 40)" in mixed
    with pytest.raises(UserError, match="--retune_tag"):
        results.main([str(root), "--retune_tag", "p20"])
