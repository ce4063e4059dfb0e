"""The entry scripts as a user runs them: `python attack/badnet.py ...` and `python fine_tune/ft.py ...`
from the repository root, in subprocesses, on the tiny CIFAR-10 of conftest.

Mistakes must end with exit status 2, exactly one `error: ...` line on stderr, no traceback, and
nothing changed on disk. The error cases run concurrently (each in its own copy of the records)
because starting Python with torch dominates their cost.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

import models
from conftest import RECORD_REL, REPO_ROOT, copy_record
from utils.defenses.purify import MODES, der

ATTACK = "attack/badnet.py"
FT = "fine_tune/ft.py"
PROTOTYPE = REPO_ROOT / "config" / "attack" / "prototype" / "cifar10.yaml"


def run_script(script: str, args, cwd: Path = REPO_ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def snapshot(root: Path) -> dict[str, object]:
    """Every file under `root` with its size, mtime and bytes; folders as 'dir'."""
    out: dict[str, object] = {}
    if not root.exists():
        return out
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_file():
            st = path.stat()
            out[rel] = (st.st_size, st.st_mtime_ns, path.read_bytes())
        else:
            out[rel] = "dir"
    return out


def assert_unchanged(before: dict, root: Path) -> None:
    after = snapshot(root)
    files_before = {k: v for k, v in before.items() if v != "dir"}
    files_after = {k: v for k, v in after.items() if v != "dir"}
    added = sorted(set(files_after) - set(files_before))
    removed = sorted(set(files_before) - set(files_after))
    modified = sorted(k for k in set(files_before) & set(files_after) if files_before[k] != files_after[k])
    assert not (added or removed or modified), f"files added {added}, removed {removed}, modified {modified}"
    # no staging leftovers (StagedFolder's `.<name>.partial-*` and `.<name>.old-*`), empty or not
    leftovers = [k for k in after if ".partial-" in k or ".old-" in k]
    assert not leftovers, f"staging folders left behind: {leftovers}"


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, one `error:` line on stderr naming every fragment, no traceback anywhere."""
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def ft_args(record_root: Path, data_root: Path, *extra) -> list:
    return ["--record_root", record_root, "--dataset_path", data_root, "--dataset", "cifar10", "--attack", "badnet",
            "--model", "smallcnn", "--device", "cpu", "--epochs", 1, "--progress", "false", *extra]


def attack_args(record_root: Path, data_root: Path, *extra) -> list:
    return ["--yaml_path", "config/attack/prototype/cifar10.yaml", "--dataset_path", data_root, "--download", "false",
            "--model", "smallcnn", "--epochs", 1, "--device", "cpu", "--record_root", record_root,
            "--progress", "false", "--batch_size", 32, *extra]


def write_yaml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- error cases ---------------------------------------------------------------------------------

@dataclass
class Case:
    script: str
    args: list
    fragments: list[str]
    root: Path
    before: dict = field(default_factory=dict)
    proc: subprocess.CompletedProcess | None = None


def _build_cases(base: Path, data: Path, record: Path) -> dict[str, Case]:
    empty = base / "empty-data"
    empty.mkdir()
    cases: dict[str, Case] = {}

    def root_with_record(name: str, rel: Path = RECORD_REL) -> Path:
        root = base / name / "record"
        copy_record(record, root, rel)
        return root

    def ft(name, extra, fragments, root=None):
        root = root or root_with_record(name)
        cases[name] = Case(FT, ft_args(root, data, *extra), fragments, root)

    def attack(name, extra, fragments, root=None):
        root = root or root_with_record(name)
        cases[name] = Case(ATTACK, attack_args(root, data, *extra), fragments, root)

    existing = str(RECORD_REL)
    root = base / "ft-no-record" / "record"
    copy_record(record, root)
    ft("ft-no-record", ["--pratio", "0.05"],
       [str(root / "cifar10" / "badnet" / "pratio_0.05-target_0-archi_smallcnn"), existing], root)
    root = root_with_record("ft-corrupt")
    result_file = root / RECORD_REL / "attack_result.pt"
    data_bytes = result_file.read_bytes()
    result_file.write_bytes(data_bytes[: len(data_bytes) // 2])
    ft("ft-corrupt", [], [str(result_file), "corrupt"], root)
    ft("ft-unknown-mode", ["--ft_mode", "finetune"], ["finetune", "fst", "ft-init", "fe-tuning"])
    ft("ft-eval-every-zero", ["--eval_every", "0"], ["--eval_every", "positive"])
    ft("ft-unknown-attack", ["--attack", "nosuchattack"], ["nosuchattack", "badnet", "blended"])
    ft("ft-unknown-model", ["--model", "resnet99"], ["resnet99", "smallcnn", "resnet18"])
    ft("ft-unknown-dataset", ["--dataset", "mnist"], ["mnist", "cifar10"])
    ft("ft-split-zero", ["--split_ratio", "0"], ["--split_ratio", "got 0.0"])
    ft("ft-split-big", ["--split_ratio", "1.5"], ["--split_ratio", "got 1.5"])
    ft("ft-missing-dataset", ["--dataset_path", empty], [str(empty), "not found"])
    # a record whose folder says resnet18 but whose content was made with smallcnn
    mismatch = root_with_record("ft-model-mismatch", RECORD_REL.parent / "pratio_0.1-target_0-archi_resnet18")
    ft("ft-model-mismatch", ["--model", "resnet18"], ["smallcnn", "resnet18"], mismatch)

    attack("attack-unknown-model", ["--model", "resnet99"], ["resnet99", "smallcnn"])
    attack("attack-unknown-dataset", ["--dataset", "cifar11"], ["cifar11", "cifar10", "gtsrb"])
    bad_key = write_yaml(base / "yaml" / "bad_key.yaml", PROTOTYPE.read_text() + "epochz: 1\n")
    attack("attack-unknown-yaml-key", ["--yaml_path", bad_key],
           [str(bad_key), "epochz", "valid keys", "epochs", "batch_size", "attack_target"])
    bad_type = write_yaml(base / "yaml" / "bad_type.yaml", PROTOTYPE.read_text().replace("epochs: 100", "epochs: ten"))
    attack("attack-yaml-wrong-type", ["--yaml_path", bad_type], [str(bad_type), "epochs", "ten"])
    bad_patch = write_yaml(base / "yaml" / "bad_patch.yaml", "patch: circle\npatch_size: 3\n")
    attack("attack-bd-yaml-bad-choice", ["--bd_yaml_path", bad_patch], [str(bad_patch), "patch", "circle", "square"])
    attack("attack-pratio-above-one", ["--pratio", "1.5"], ["pratio", "got 1.5"])
    attack("attack-pratio-negative", ["--pratio", "-0.1"], ["pratio", "got -0.1"])
    # a setting with no record yet, so the missing data is what stops it
    attack("attack-missing-dataset", ["--dataset_path", empty, "--pratio", "0.2"], [str(empty), "not found"])
    attack("attack-existing-record", [], [str(root_path(base, "attack-existing-record")), "already exists", "--overwrite"])
    return cases


def root_path(base: Path, name: str) -> Path:
    return base / name / "record" / RECORD_REL


@pytest.fixture(scope="module")
def error_cases(tmp_path_factory, tiny_cifar10, badnet_record) -> dict[str, Case]:
    base = tmp_path_factory.mktemp("cli-errors")
    cases = _build_cases(base, tiny_cifar10, badnet_record)
    for case in cases.values():
        case.before = snapshot(case.root)

    def go(case: Case) -> None:
        case.proc = run_script(case.script, case.args)

    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(go, cases.values()))
    return cases


ERROR_CASES = [
    "ft-no-record", "ft-corrupt", "ft-unknown-mode", "ft-unknown-attack", "ft-unknown-model", "ft-unknown-dataset",
    "ft-split-zero", "ft-split-big", "ft-missing-dataset", "ft-model-mismatch", "ft-eval-every-zero",
    "attack-unknown-model", "attack-unknown-dataset", "attack-unknown-yaml-key", "attack-yaml-wrong-type",
    "attack-bd-yaml-bad-choice", "attack-pratio-above-one", "attack-pratio-negative", "attack-missing-dataset",
    "attack-existing-record",
]


@pytest.mark.parametrize("name", ERROR_CASES)
def test_user_error(error_cases, name):
    case = error_cases[name]
    assert_user_error(case.proc, *case.fragments)
    assert_unchanged(case.before, case.root)


def test_every_error_case_is_checked(error_cases):
    assert sorted(error_cases) == sorted(ERROR_CASES)


def test_unknown_yaml_key_lists_every_valid_key(error_cases):
    line = assert_user_error(error_cases["attack-unknown-yaml-key"].proc)
    from utils.attacks.registry import get_attack
    from utils.victim.experiment import attack_options
    for option in attack_options(get_attack("badnet")):
        if option.yaml:
            assert option.name in line


# --- the attack script: successful runs ----------------------------------------------------------

@pytest.fixture(scope="module")
def precedence_run(tmp_path_factory, tiny_cifar10):
    """The paper's script-relative `--yaml_path ../config/...`, an attack YAML that overrides the
    prototype (grid patch, 1 epoch, lr 0.05), a flag that overrides the attack YAML (--patch square),
    and `--device cuda:0` on a machine without CUDA."""
    base = tmp_path_factory.mktemp("cli-precedence")
    bd_yaml = write_yaml(base / "grid_short.yaml", "patch: grid\npatch_size: 3\nepochs: 1\nlr: 0.05\n")
    root = base / "record"
    proc = run_script(ATTACK, [
        "--yaml_path", "../config/attack/prototype/cifar10.yaml", "--bd_yaml_path", bd_yaml, "--patch", "square",
        "--dataset_path", tiny_cifar10, "--download", "false", "--model", "smallcnn", "--device", "cuda:0",
        "--record_root", root, "--progress", "false", "--batch_size", 32])
    return proc, root / RECORD_REL, [base, tiny_cifar10]


def test_attack_script_relative_yaml_runs(precedence_run):
    proc, folder, _ = precedence_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (folder / "attack_result.pt").is_file()


def test_attack_cuda_request_without_cuda_warns_once(precedence_run):
    proc, _, _ = precedence_run
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("CUDA is not available") == 1, proc.stderr
    assert "error:" not in proc.stderr


def test_attack_precedence_flag_over_attack_yaml_over_prototype(precedence_run):
    proc, folder, _ = precedence_run
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    proto = yaml.safe_load(PROTOTYPE.read_text())
    assert proto["epochs"] == 100 and proto["lr"] == 0.1 and proto["model"] == "resnet18"
    assert cfg["epochs"] == 1          # attack YAML over prototype
    assert cfg["lr"] == 0.05           # attack YAML over prototype
    assert cfg["patch"] == "square"    # flag over attack YAML (grid)
    assert cfg["model"] == "smallcnn"  # flag over prototype
    assert cfg["batch_size"] == 32     # flag over prototype
    assert cfg["wd"] == proto["wd"] and cfg["sgd_momentum"] == proto["sgd_momentum"]  # prototype over defaults
    assert cfg["yaml_path"] == "config/attack/prototype/cifar10.yaml"
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    assert len(rows) == 1  # really trained for the attack YAML's one epoch
    record = torch.load(folder / "attack_result.pt", map_location="cpu", weights_only=True)
    pattern, mask = record["trigger"]["pattern"], record["trigger"]["mask"]
    # the square trigger: a solid white 3x3 block in the bottom-right corner (the grid has black cells)
    assert int(mask.sum()) == 9 and bool(mask[29:, 29:].all())
    assert bool((pattern[:, 29:, 29:] == 255).all())


def test_attack_record_contents(precedence_run):
    proc, folder, _ = precedence_run
    assert proc.returncode == 0, proc.stderr
    for name in ("attack_result.pt", "config.yaml", "metrics.csv", "summary.json"):
        assert (folder / name).is_file(), name
    record = torch.load(folder / "attack_result.pt", map_location="cpu", weights_only=True)
    for key in ("model_name", "num_classes", "image_size", "dataset", "poison_indices", "trigger", "model"):
        assert key in record, key
    assert record["model_name"] == "smallcnn" and record["num_classes"] == 10
    assert record["image_size"] == 32 and record["dataset"] == "cifar10"
    poison = record["poison_indices"]
    assert poison.dtype == torch.int64 and len(poison) == 30 and len(set(poison.tolist())) == 30  # round(0.1 * 300)
    net = models.build_model("smallcnn", 10, 3, 32)
    net.load_state_dict(record["model"])  # the weights fit the named architecture
    header = (folder / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:7] == ["epoch", "lr", "train_loss", "train_acc", "clean_acc", "asr", "ra"]
    summary = json.loads((folder / "summary.json").read_text())
    for key in ("clean_acc", "asr", "ra"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["poisoned"] == 30 and summary["train_size"] == 300


def test_attack_record_holds_no_absolute_path(precedence_run):
    """A record folder can be moved or shared: none of its files may hold the absolute paths of
    this run (the temporary folders, the dataset folder, the repository)."""
    proc, folder, tmp_paths = precedence_run
    assert proc.returncode == 0, proc.stderr
    forbidden = {str(p) for p in tmp_paths} | {str(REPO_ROOT), str(folder)}
    hits = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            raw = path.read_bytes()
            hits += [f"{path.name}: {p}" for p in forbidden if p.encode() in raw]
    assert not hits, f"absolute paths inside the record: {hits}"


def test_attack_cwd_relative_yaml_and_pratio_zero(tmp_path, tiny_cifar10):
    root = tmp_path / "record"
    proc = run_script(ATTACK, attack_args(root, tiny_cifar10, "--pratio", "0"))
    assert proc.returncode == 0, proc.stderr
    folder = root / "cifar10" / "badnet" / "pratio_0.0-target_0-archi_smallcnn"
    record = torch.load(folder / "attack_result.pt", map_location="cpu", weights_only=True)
    assert record["pratio"] == 0.0 and len(record["poison_indices"]) == 0
    assert json.loads((folder / "summary.json").read_text())["poisoned"] == 0
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    assert cfg["yaml_path"] == "config/attack/prototype/cifar10.yaml" and cfg["pratio"] == 0.0


# --- ft.py: successful runs ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def ft_all_run(tmp_path_factory, tiny_cifar10, badnet_record):
    root = tmp_path_factory.mktemp("cli-ft-all") / "record"
    folder = copy_record(badnet_record, root)
    proc = run_script(FT, ft_args(root, tiny_cifar10, "--ft_mode", "all", "--save", "--split_ratio", "0.1"))
    return proc, folder, [root.parent, tiny_cifar10]


def test_ft_all_writes_one_result_per_mode(ft_all_run):
    proc, folder, _ = ft_all_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    befores = []
    for mode in MODES:
        out = folder / "defense" / mode
        result = json.loads((out / "result.json").read_text())
        assert result["ft_mode"] == mode
        for part in ("before", "after"):
            for key in ("clean_acc", "asr", "ra"):
                assert 0.0 <= result[part][key] <= 1.0, (mode, part, key)
        assert result["der"] == pytest.approx(der(result["before"], result["after"]))
        assert result["args"]["ft_mode"] == mode and result["args"]["epochs"] == 1
        assert result["tuning_size"] == 30  # int(300 * 0.1)
        assert (out / "metrics.csv").is_file() and (out / "config.yaml").is_file()
        befores.append(result["before"])
        assert mode in proc.stdout  # the comparison table
    assert all(b == befores[0] for b in befores)  # one backdoored model, evaluated once


def test_ft_save_writes_loadable_weights(ft_all_run):
    proc, folder, _ = ft_all_run
    assert proc.returncode == 0, proc.stderr
    reference = models.build_model("smallcnn", 10, 3, 32)
    heads = []
    for mode in MODES:
        state = torch.load(folder / "defense" / mode / "model.pt", map_location="cpu", weights_only=True)
        reference.load_state_dict(state)  # strict: exactly the architecture's keys and shapes
        heads.append(state["linear.weight"])
    original = torch.load(folder / "attack_result.pt", map_location="cpu", weights_only=True)["model"]
    # re-initialising modes end with a head unlike the backdoored one; ft/lp start from it
    for mode, head in zip(MODES, heads):
        diff = float((head - original["linear.weight"]).abs().max())
        if MODES[mode].reinit_head:
            assert diff > 1e-2, mode


def test_ft_outputs_in_the_record_hold_no_absolute_path(ft_all_run):
    """The purification results live inside the record folder, which must stay movable."""
    proc, folder, tmp_paths = ft_all_run
    assert proc.returncode == 0, proc.stderr
    forbidden = {str(p) for p in tmp_paths} | {str(REPO_ROOT)}
    hits = []
    for path in sorted((folder / "defense").rglob("*")):
        if path.is_file():
            raw = path.read_bytes()
            hits += [f"{path.relative_to(folder)}: {p}" for p in forbidden if p.encode() in raw]
    assert not hits, f"absolute paths inside the record: {hits}"


def test_ft_paper_command_then_same_mode_again_refuses(tmp_path, tiny_cifar10, badnet_record):
    """The README's exact command (with --model smallcnn, one epoch and the tiny data), twice."""
    root = tmp_path / "record"
    folder = copy_record(badnet_record, root)
    args = ["--attack", "badnet", "--split_ratio", "0.02", "--pratio", "0.1", "--device", "cuda:0", "--lr", "0.01",
            "--attack_target", "0", "--model", "smallcnn", "--dataset", "cifar10", "--epochs", "1", "--ft_mode", "fst",
            "--alpha", "0.1", "--record_root", root, "--dataset_path", tiny_cifar10, "--progress", "false"]
    first = run_script(FT, args)
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    if not torch.cuda.is_available():
        assert first.stderr.count("CUDA is not available") == 1, first.stderr
    result_path = folder / "defense" / "fst" / "result.json"
    result = json.loads(result_path.read_text())
    assert result["tuning_size"] == 6  # int(300 * 0.02)
    assert result["args"]["alpha"] == 0.1 and result["args"]["lr"] == 0.01 and result["args"]["split_ratio"] == 0.02
    for part in ("before", "after"):
        assert {"clean_acc", "asr", "ra"} <= result[part].keys()

    before = snapshot(root)
    second = run_script(FT, args)
    assert_user_error(second, str(folder / "defense" / "fst"), "already exists", "--overwrite")
    assert_unchanged(before, root)


def test_ft_eval_every_leaves_unevaluated_epochs_empty(tmp_path, tiny_cifar10, badnet_record):
    """--eval_every 2 over 3 epochs evaluates epochs 2 and 3 (the last always); the result is the last
    evaluation and epoch 1's metric cells are empty."""
    root = tmp_path / "record"
    folder = copy_record(badnet_record, root)
    proc = run_script(FT, ft_args(root, tiny_cifar10, "--epochs", "3", "--eval_every", "2", "--ft_mode", "ft", "--split_ratio", "0.1"))
    assert proc.returncode == 0, proc.stderr
    lines = (folder / "defense" / "ft" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["clean_acc"] == rows[0]["asr"] == rows[0]["ra"] == ""
    assert all(r[k] != "" for r in rows[1:] for k in ("clean_acc", "asr", "ra"))
    result = json.loads((folder / "defense" / "ft" / "result.json").read_text())
    assert result["after"]["asr"] == pytest.approx(float(rows[2]["asr"]), abs=1e-5)
