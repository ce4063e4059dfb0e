"""Hostile and careless command lines, through the entry scripts as a user runs them.

Every case is an entry script, its arguments and a fragment of the one error line it must print:
exit status 2, exactly one `error:` line on stderr, no traceback, no file created under the case's
own record root. All of them fail while the command line and the YAML files are read (no data, no
training), so the whole list runs in one Python process: each case executes the real entry script
(`runpy`, with `sys.argv` set and stdout/stderr captured), as `python attack/badnet.py ...` would,
without paying for a fresh torch import per case.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO_ROOT

ATTACK, LC, WANET, INPUTAWARE = "attack/badnet.py", "attack/lc.py", "attack/wanet.py", "attack/inputaware.py"
FT, RETUNE, QRA, SWEEP = "fine_tune/ft.py", "fine_tune/ft_poison.py", "fine_tune/qra.py", "-m utils.sweep"
FMNIST = "config/attack/prototype/fmnist.yaml"
HUGE_INT = str(2**64)  # torch.manual_seed raises beyond 2**64 - 1

# Runs each case's entry script in this process and prints one JSON line per case. An exception
# that escapes the script is printed as Python would (a traceback), so the test sees it.
HARNESS = r"""
import contextlib, io, json, os, runpy, sys, traceback
sys.path.insert(0, os.getcwd())
results = []
for script, argv in json.load(sys.stdin):
    err, out = io.StringIO(), io.StringIO()
    code = 0
    sys.argv = [script, *argv]
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            if script.startswith("-m "):
                runpy.run_module(script[3:], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(script, run_name="__main__")
        except SystemExit as exit_:
            if isinstance(exit_.code, str):
                print(exit_.code, file=sys.stderr)
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"code": code, "stderr": err.getvalue(), "stdout": out.getvalue()})
sys.stdout.write(json.dumps(results))
"""


def run_many(commands: list[tuple[str, list[str]]], timeout: int = 300) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", HARNESS], input=json.dumps(commands), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@dataclass
class Case:
    name: str
    script: str
    args: list[str]
    fragment: str
    root: Path = field(default=None)  # the record root the case names; nothing may appear in it
    result: dict = field(default_factory=dict)
    before: dict = field(default_factory=dict)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} \
        if root.exists() else {}


def _writer(real: bool):
    def write(path: Path, content: str | bytes) -> Path:
        if real:
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return path
    return write


def _billion_laughs() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    return "\n".join(lines) + "\nepochs: *i\n"


def _cases(base: Path, real: bool = True) -> list[Case]:
    """The cases; `real` False only names them (nothing is written)."""
    _write = _writer(real)
    yamls = base / "yaml"
    laughs = _write(yamls / "laughs.yaml", _billion_laughs())
    big = _write(yamls / "big.yaml", "epochs: 1\n" + "# padding\n" * 120_000)
    binary = _write(yamls / "binary.yaml", bytes(range(256)) * 4)
    nan_lr = _write(yamls / "nan_lr.yaml", "lr: .nan\n")
    listed = _write(yamls / "list.yaml", "epochs: [1, 2]\n")
    pyobj = _write(yamls / "pyobj.yaml", 'epochs: !!python/object/apply:os.system ["echo hacked"]\n')
    deep = _write(yamls / "deep.yaml", "epochs: " + "[" * 50_000 + "]" * 50_000 + "\n")
    long_key = _write(yamls / "long_key.yaml", "x" * 1000 + ": 1\n")
    bad_proto = _write(yamls / "proto.yaml", (REPO_ROOT / FMNIST).read_text().replace("dataset: fmnist", "dataset: ../../x"))
    folder_yaml = yamls / "a_folder.yaml"
    empty = base / "no-data"
    if real:
        folder_yaml.mkdir()
        empty.mkdir()
    cases: list[Case] = []

    def root(name):
        return base / name / "record"

    def attack(name, extra, fragment, script=ATTACK):
        r = root(name)
        cases.append(Case(name, script, ["--yaml_path", FMNIST, "--record_root", str(r), "--dataset_path", str(empty),
                                         "--download", "false", "--device", "cpu", "--progress", "false", *extra],
                          fragment, r))

    def record_cmd(name, script, extra, fragment):
        r = root(name)
        cases.append(Case(name, script, ["--record_root", str(r), "--dataset_path", str(empty), "--dataset", "fmnist",
                                         "--model", "smallcnn", "--device", "cpu", "--progress", "false", *extra],
                          fragment, r))

    def sweep(name, stage, extra, fragment, r=None):
        r = r or root(name)
        head = ["--yaml_path", FMNIST] if stage == "attacks" else []
        cases.append(Case(name, SWEEP, [stage, *head, "--record_root", str(r), *extra], fragment, r))

    # --- attack scripts: numbers -----------------------------------------------------------------
    attack("attack-lr-nan", ["--lr", "nan"], "--lr must be a finite number")
    attack("attack-lr-inf", ["--lr", "inf"], "--lr must be a finite number")
    attack("attack-lr-overflow", ["--lr", "1e999"], "--lr must be a finite number")
    attack("attack-lr-negative", ["--lr", "-0.1"], "--lr must be positive")
    attack("attack-momentum-negative", ["--sgd_momentum", "-1"], "--sgd_momentum must be within [0, 1)")
    attack("attack-wd-negative", ["--wd", "-1"], "--wd must be 0 or positive")
    attack("attack-seed-huge", ["--random_seed", HUGE_INT], "--random_seed must be within")
    attack("attack-seed-negative", ["--random_seed", "-1"], "--random_seed must be within [0, 2**63 - 1]")
    attack("attack-epochs-zero", ["--epochs", "0"], "--epochs must be positive")
    attack("attack-epochs-float", ["--epochs", "1.5"], "--epochs must be an integer")
    attack("attack-batch-huge", ["--batch_size", "1" + "0" * 30], "--batch_size must fit in 64 bits")
    attack("attack-pratio-nan", ["--pratio", "nan"], "--pratio must be a finite number")
    attack("attack-pratio-big", ["--pratio", "2"], "--pratio must be within [0, 1]")
    attack("attack-target-negative", ["--attack_target", "-1"], "--attack_target must be 0 or positive")
    attack("attack-input-size-huge", ["--input_size", "100000"], "--input_size must be within")
    attack("attack-patch-size-zero", ["--patch_size", "0"], "--patch_size must be within [1, 32]")
    attack("wanet-k-zero", ["--k", "0"], "--k must be within", WANET)
    attack("wanet-s-nan", ["--s", "nan"], "--s must be a finite number", WANET)
    attack("inputaware-depth", ["--net_depth", "100"], "--net_depth must be within", INPUTAWARE)
    attack("lc-eps-inf", ["--lc_eps", "inf"], "--lc_eps must be a finite number", LC)
    # --- attack scripts: names, flags -------------------------------------------------------------
    attack("attack-model-path", ["--model", "../../x"], "--model is not a registered model")
    attack("attack-model-huge", ["--model", "m" * 3000], "--model is not a registered model")
    attack("attack-path-huge", ["--dataset_path", "d" * 20000], "--dataset_path must be at most 4096 characters")
    attack("attack-dataset-path", ["--dataset", "../x"], "--dataset must be one of")
    attack("lc-surrogate-model-path", ["--surrogate_model", "../../evil"], "--surrogate_model is not one of", LC)
    attack("attack-device-bogus", ["--device", "gpu7"], "--device must be auto, cpu, cuda")
    attack("attack-overwrite-word", ["--overwrite", "maybe"], "--overwrite must be true or false")
    attack("attack-unknown-flag", ["--bogus", "1"], "unrecognized arguments: --bogus")
    attack("attack-flag-without-value", ["--epochs"], "argument --epochs: expected one argument")
    # --- YAML files -------------------------------------------------------------------------------
    attack("yaml-billion-laughs", ["--bd_yaml_path", str(laughs)], "anchors and aliases")
    attack("yaml-too-big", ["--bd_yaml_path", str(big)], "at most 1048576 bytes")
    attack("yaml-binary", ["--bd_yaml_path", str(binary)], "not UTF-8")
    attack("yaml-nan", ["--bd_yaml_path", str(nan_lr)], "lr must be a finite number")
    attack("yaml-list-value", ["--bd_yaml_path", str(listed)], "epochs must be an integer, got a YAML list")
    attack("yaml-python-object", ["--bd_yaml_path", str(pyobj)], "not valid YAML (could not determine a constructor")
    attack("yaml-deep", ["--bd_yaml_path", str(deep)], "nested too deeply")
    attack("yaml-long-key", ["--bd_yaml_path", str(long_key)], "unknown key(s) xxxx")
    attack("yaml-is-a-folder", ["--bd_yaml_path", str(folder_yaml)], "is a folder, not a file")
    attack("yaml-is-a-device", ["--bd_yaml_path", "/dev/zero"], "'/dev/zero' is not a regular file")
    attack("yaml-missing", ["--bd_yaml_path", str(yamls / "none.yaml")], "attack YAML")
    record_cmd("ft-yaml-billion-laughs", FT, ["--yaml_path", str(laughs)], "anchors and aliases")
    # --- ft.py ------------------------------------------------------------------------------------
    record_cmd("ft-lr-nan", FT, ["--lr", "nan"], "--lr must be a finite number")
    record_cmd("ft-alpha-inf", FT, ["--alpha", "inf"], "--alpha must be a finite number")
    record_cmd("ft-alpha-negative", FT, ["--alpha", "-1"], "--alpha must be 0 or positive")
    record_cmd("ft-lb-smooth-nan", FT, ["--lb_smooth", "nan"], "--lb_smooth must be a finite number")
    record_cmd("ft-momentum-negative", FT, ["--momentum", "-1"], "--momentum must be within [0, 1)")
    record_cmd("ft-wd-negative", FT, ["--wd", "-1"], "--wd must be 0 or positive")
    record_cmd("ft-seed-huge", FT, ["--random_seed", HUGE_INT], "--random_seed must be within")
    record_cmd("ft-seed-negative", FT, ["--random_seed", "-3"], "--random_seed must be within [0, 2**63 - 1]")
    record_cmd("ft-split-nan", FT, ["--split_ratio", "nan"], "--split_ratio must be a finite number")
    record_cmd("ft-sam-rho-nan", FT, ["--sam_rho", "nan"], "--sam_rho must be a finite number")
    record_cmd("ft-pratio-negative", FT, ["--pratio", "-0.5"], "--pratio must be within [0, 1]")
    record_cmd("ft-attack-path", FT, ["--attack", "../../x"], "--attack is not one of")
    record_cmd("ft-dataset-path", FT, ["--dataset", "../../x"], "--dataset is not one of")
    record_cmd("ft-model-path", FT, ["--model", "../x"], "--model is not one of")
    record_cmd("ft-tag-path", FT, ["--tag", "../x"], "--tag may hold only")
    record_cmd("ft-mode-path", FT, ["--ft_mode", "../x"], "unknown --ft_mode")
    record_cmd("ft-linear-name", FT, ["--linear_name", "a/b"], "--linear_name must be a dotted attribute path")
    record_cmd("ft-save-word", FT, ["--save", "perhaps"], "--save must be true or false")
    record_cmd("ft-log-word", FT, ["--log", "perhaps"], "--log must be true or false")
    record_cmd("ft-device-bogus", FT, ["--device", "cuda:x"], "--device must be auto, cpu, cuda")
    # --- ft_poison.py, qra.py ---------------------------------------------------------------------
    record_cmd("retune-defense-path", RETUNE, ["--defense_type", "../../x"], "--defense_type is not a folder name")
    record_cmd("retune-lr-inf", RETUNE, ["--lr", "inf"], "--lr must be a finite number")
    record_cmd("retune-poison-negative", RETUNE, ["--poison_num", "-1"], "--poison_num must be 0 or positive")
    record_cmd("retune-seed-negative", RETUNE, ["--random_seed", "-5"], "--random_seed must be within")
    record_cmd("retune-attack-path", RETUNE, ["--attack", "../x"], "--attack is not one of")
    record_cmd("retune-tag-path", RETUNE, ["--tag", "a/b"], "--tag may hold only")
    record_cmd("qra-eps-nan", QRA, ["--eps", "nan"], "--eps must be a finite number")
    record_cmd("qra-defense-path", QRA, ["--defense_type", "../x"], "--defense_type is not a folder name")
    record_cmd("qra-retune-tag-path", QRA, ["--retune_tag", "../x"], "--retune_tag may hold only")
    record_cmd("qra-hidden-huge", QRA, ["--hidden", "100000000"], "--hidden must be up to 16")
    record_cmd("qra-seed-huge", QRA, ["--random_seed", HUGE_INT], "--random_seed must be within")
    # --- sweep ------------------------------------------------------------------------------------
    sweep("sweep-attacks-path", "attacks", ["--attacks", "../../x", "--pratios", "0.1"], "unknown attack '../../x'")
    sweep("sweep-pratios-nan", "attacks", ["--attacks", "badnet", "--pratios", "nan"], "--pratios takes")
    sweep("sweep-seeds-negative", "attacks", ["--attacks", "badnet", "--pratios", "0.1", "--seeds", "-1"], "--seeds takes")
    sweep("sweep-seeds-huge", "attacks", ["--attacks", "badnet", "--pratios", "0.1", "--seeds", HUGE_INT], "--seeds takes")
    sweep("sweep-workers-zero", "attacks", ["--attacks", "badnet", "--pratios", "0.1", "--workers", "0"], "--workers takes")
    sweep("sweep-model-path", "attacks", ["--attacks", "badnet", "--pratios", "0.1", "--model", "../x"], "--model '../x'")
    sweep("sweep-target-negative", "attacks", ["--attacks", "badnet", "--pratios", "0.1", "--attack_target", "-1"],
          "--attack_target takes")
    cases.append(Case("sweep-proto-dataset-path", SWEEP, ["attacks", "--yaml_path", str(bad_proto), "--attacks", "badnet",
                                                          "--pratios", "0.1", "--record_root", str(root("sweep-proto"))],
                      "dataset '../../x' is not one of", root("sweep-proto")))
    cases.append(Case("sweep-proto-dev-zero", SWEEP, ["attacks", "--yaml_path", "/dev/zero", "--attacks", "badnet",
                                                      "--pratios", "0.1", "--record_root", str(root("sweep-zero"))],
                      "/dev/zero: not a regular file", root("sweep-zero")))
    sweep("sweep-no-yaml", "purify", ["--yaml_path", FMNIST], "unrecognized arguments: --yaml_path")
    sweep("sweep-modes-unknown", "purify", ["--modes", "ft", "nonsense"], "unknown --ft_mode 'nonsense'")
    sweep("sweep-tag-path", "purify", ["--tag", "../x"], "--tag may hold only")
    sweep("sweep-defense-path", "retune", ["--defenses", "../x"], "unknown defense '../x'")
    sweep("sweep-dry-run-word", "purify", ["--dry_run", "maybe"], "argument --dry_run: expected true or false")
    sweep("sweep-submitit-params", "attacks", ["--attacks", "badnet", "--pratios", "0.1", "--executor", "submitit",
                                               "--submitit_params", "[1]", "--dry_run"], "must be a JSON object")
    # a sweep root holding a record whose config.yaml is broken: one error naming the file
    for name, text in (("sweep-broken-config", "attack: badnet\npratio: [0.1\n"),
                       ("sweep-config-laughs", _billion_laughs()),
                       ("sweep-config-wrong-type", "attack: badnet\ndataset: fmnist\nmodel: smallcnn\npratio: abc\n"
                                                   "attack_target: 0\n")):
        r = root(name)
        folder = r / "seed_0" / "fmnist" / "badnet" / "pratio_0.1-target_0-archi_smallcnn"
        _write(folder / "attack_result.pt", b"not read by the sweep")
        config = _write(folder / "config.yaml", text)
        sweep(name, "purify", ["--dry_run"], str(config), r)
    return cases


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Case]:
    base = tmp_path_factory.mktemp("hostile")
    cases = _cases(base)
    for case in cases:
        case.before = _files(case.root)
    for case, result in zip(cases, run_many([(c.script, c.args) for c in cases])):
        case.result = result
    return {c.name: c for c in cases}


CASE_NAMES = [c.name for c in _cases(Path("unused"), real=False)]


def test_cases_have_unique_names():
    assert len(CASE_NAMES) == len(set(CASE_NAMES))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_hostile_case_is_one_error_line(hostile, name):
    case = hostile[name]
    res = case.result
    assert "Traceback" not in res["stderr"] and "Traceback" not in res["stdout"], res["stderr"][-3000:]
    assert res["code"] == 2, f"exit {res['code']}\nstdout: {res['stdout'][-2000:]}\nstderr: {res['stderr'][-2000:]}"
    lines = [ln for ln in res["stderr"].splitlines() if "error:" in ln]
    assert len(lines) == 1 and len(res["stderr"].splitlines()) <= 2, res["stderr"][-2000:]
    line = lines[0]
    assert line.startswith("error: ") and case.fragment in line, line[:2000]
    assert len(line) < 1200, f"error line of {len(line)} characters"
    assert _files(case.root) == case.before, "files appeared or changed under the record root"


def test_huge_values_are_cut_in_the_error_line(hostile):
    for name in ("attack-model-huge", "yaml-long-key", "yaml-billion-laughs"):
        line = hostile[name].result["stderr"].strip().splitlines()[-1]
        assert len(line) < 800, (name, len(line))


# --- what a new user gets right ----------------------------------------------------------------

def _help_entries(text: str) -> dict[str, str]:
    """--flag -> its whole help text, from argparse's --help output."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("  -") and not line.startswith("   "):
            current = stripped.split()[0].rstrip(",")
            entries[current] = stripped
        elif current and line.startswith("    ") and stripped:
            entries[current] += " " + stripped
        elif not stripped:
            current = None
    return entries


HELP_SCRIPTS = [
    *[(f"attack/{p.name}", []) for p in sorted((REPO_ROOT / "attack").glob("*.py"))],
    (FT, []), (RETUNE, []), (QRA, []),
    *[(SWEEP, [stage]) for stage in ("attacks", "purify", "retune", "jobs")],
]


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    results = run_many([(s, [*pre, "--help"]) for s, pre in HELP_SCRIPTS] +
                       [(ATTACK, ["--yaml_path", FMNIST, "--help"])])
    out = {}
    for (script, pre), res in zip(HELP_SCRIPTS + [(ATTACK + " fmnist", [])], results):
        assert res["code"] == 0, res["stderr"]
        out[" ".join([script, *pre])] = res["stdout"]
    return out


def test_every_flag_of_every_entry_script_states_its_default(helps):
    for script, text in helps.items():
        entries = _help_entries(text)
        assert len(entries) > 3, script
        for flag, entry in entries.items():
            if flag in ("-h", "--help"):
                continue
            assert "default" in entry or "required" in entry, f"{script} {flag}: {entry}"


def test_attack_help_shows_what_the_prototype_gives(helps):
    plain = _help_entries(helps[ATTACK])
    fmnist = _help_entries(helps[ATTACK + " fmnist"])
    assert "default here: resnet18" in plain["--model"] and "default here: smallcnn" in fmnist["--model"]
    assert "default here: 3" in fmnist["--epochs"] and "default here: auto" in fmnist["--device"]


def test_ft_help_lists_every_per_dataset_default(helps):
    from utils.defenses.purify import DATASET_DEFAULTS
    entries = _help_entries(helps[FT])
    for flag in ("--epochs", "--lr", "--split_ratio", "--alpha"):
        for dataset in DATASET_DEFAULTS:
            assert dataset in entries[flag], (flag, dataset)


def test_boolean_flags_take_the_bare_form_and_true_false():
    from utils.commands import finetune
    from utils.robustness import retune
    record = ["--dataset", "fmnist", "--model", "smallcnn"]
    bare = finetune.parse_args([*record, "--overwrite", "--log", "--pre", "--save", "--frozen_bn"])
    assert (bare.overwrite, bare.log, bare.pre, bare.save, bare.frozen_bn) == (True, True, True, True, True)
    spelled = finetune.parse_args([*record, "--overwrite", "false", "--log", "true", "--pre", "no", "--save", "false"])
    assert (spelled.overwrite, spelled.log, spelled.pre, spelled.save) == (False, True, False, False)
    assert retune.parse_args([*record, "--save"]).save is True
    from utils.victim.experiment import parse_attack_config
    cfg = parse_attack_config("badnet", ["--yaml_path", FMNIST, "--overwrite", "--progress", "false", "--download"])
    assert (cfg["overwrite"], cfg["progress"], cfg["download"]) == (True, False, True)


def test_device_default_is_auto_everywhere():
    from utils.commands import finetune
    from utils.robustness import qra, retune
    from utils.victim.experiment import parse_attack_config
    for module in (finetune, retune, qra):
        assert module.parse_args([]).device == "auto", module.__name__
    for proto in sorted((REPO_ROOT / "config/attack/prototype").glob("*.yaml")):
        assert parse_attack_config("badnet", ["--yaml_path", str(proto)])["device"] == "auto", proto.name


def test_sweep_lists_take_spaces_and_commas_and_dry_run_pastes(tmp_path, capsys):
    from utils.tools import sweep
    base = ["attacks", "--yaml_path", FMNIST, "--record_root", str(tmp_path), "--devices", "cpu"]
    assert sweep.main([*base, "--attacks", "badnet,", "blended", "--pratios", "0.1,0.01", "--dry_run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    for line in lines:
        command = shlex.split(line.split(": ", 1)[1])
        assert "{device}" not in line and command[command.index("--device") + 1] == "cpu"
        assert command[0].startswith("OMP_NUM_THREADS=") and Path(command[2]).is_file()
    args = sweep.build_parser().parse_args(["purify", "--record_root", "r", "--modes", "ft", "fst,lp", "--dry_run"])
    sweep._settle(args)
    assert args.modes == ["ft", "fst", "lp"] and args.dry_run is True
    args = sweep.build_parser().parse_args(["retune", "--record_root", "r", "--defenses", "fst,none", "ft",
                                            "--seeds", "0,1", "2", "--dry_run", "false"])
    sweep._settle(args)
    assert args.defenses == ["fst", "none", "ft"] and args.seeds == [0, 1, 2] and args.dry_run is False


def test_missing_prototype_is_said_plainly(tmp_path):
    """No --yaml_path: one warning line says which defaults are used; the missing CIFAR-10 then
    names the small prototype. Also a real process, start to end."""
    empty = tmp_path / "data"
    empty.mkdir()
    root = tmp_path / "record"
    proc = subprocess.run([sys.executable, ATTACK, "--dataset_path", str(empty), "--download", "false", "--model",
                           "smallcnn", "--device", "cpu", "--record_root", str(root), "--progress", "false"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("warning: no --yaml_path given") and "cifar10" in lines[0] and FMNIST in lines[0]
    assert lines[1].startswith("error: dataset 'cifar10' not found") and f"--yaml_path {FMNIST}" in lines[1]
    assert not [p for p in root.rglob("*") if p.is_file()]
