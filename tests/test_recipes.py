"""The sh/ recipes on top of `python -m utils.sweep jobs`: their step lists, what counts as done, and
the job-file checks of the sweep itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils.tools.sweep import load_jobs
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _dry(script: str, record_root: Path, *args: str, **env: str) -> list[str]:
    full = {**os.environ, "RECORD_ROOT": str(record_root), "SWEEP_ARGS": "--dry_run", "PYTHON": sys.executable, **env}
    proc = subprocess.run(["bash", f"sh/{script}", *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [line for line in proc.stdout.splitlines() if line.startswith("[")]


def test_robustness_recipe_lists_every_step_in_order(tmp_path):
    lines = _dry("robustness_fmnist.sh", tmp_path, ATTACKS="badnet", QRA_MODES="fst pam")
    names = [line.split("] ", 1)[1].split(":", 1)[0] for line in lines]
    assert names[0] == "attack-badnet-0.1"
    assert names[1:5] == ["badnet-ft", "badnet-fst", "badnet-ft-sam", "badnet-bti-pam"]
    assert "badnet-pam-ra20" in names and "badnet-none-ra5" in names and "badnet-clean-ra20" in names
    assert names.index("attack-badnet-0.0") < names.index("badnet-clean-ra5") < names.index("badnet-fst-qra")
    assert names[-2:] == ["badnet-fst-qra", "badnet-pam-qra"]
    assert all(line.startswith("[todo]") for line in lines)
    bti_pam = next(line for line in lines if "badnet-bti-pam:" in line)
    assert "--ft_mode bti,pam" in bti_pam and "--epochs 30" in bti_pam


def test_robustness_recipe_skips_finished_steps(tmp_path):
    rec = tmp_path / "fmnist" / "badnet" / "pratio_0.1-target_0-archi_smallcnn"
    (rec / "defense" / "pam").mkdir(parents=True)
    (rec / "attack_result.pt").write_bytes(b"x")
    (rec / "defense" / "pam" / "result.json").write_text("{}")
    lines = _dry("robustness_fmnist.sh", tmp_path, ATTACKS="badnet", QRA="0")
    done = {line.split("] ", 1)[1].split(":", 1)[0] for line in lines if line.startswith("[done]")}
    assert done == {"attack-badnet-0.1"}
    # pam is finished, so the unlearning step runs bti alone
    assert any("badnet-bti:" in line and "--ft_mode bti " in line for line in lines)


def test_attacks_recipe_selects_by_name(tmp_path):
    lines = _dry("attacks_fmnist.sh", tmp_path, "clean", "wanet")
    assert [line.split("] ", 1)[1].split(":", 1)[0] for line in lines] == ["clean", "wanet"]
    assert "--pratio 0" in lines[0] and "config/attack/wanet/fmnist_cpu.yaml" in lines[1]


def _write(path: Path, *rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_job_file_is_checked_line_by_line(tmp_path):
    ok = {"name": "a", "argv": ["true"], "outputs": ["x"], "log": "l"}
    assert load_jobs(_write(tmp_path / "ok.jsonl", ok, "", {**ok, "name": "b", "requires": ["x"]}))[1].requires == ["x"]
    for bad, message in [("{", "line 1: not JSON"), ({"name": "a"}, "missing argv, outputs, log"),
                         ({**ok, "extra": 1}, "unknown key(s) extra"), ({**ok, "argv": "true"}, "lists of strings"),
                         ({**ok, "outputs": []}, "must not be empty")]:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_jobs(_write(tmp_path / "bad.jsonl", bad))
    with pytest.raises(UserError, match="used twice"):
        load_jobs(_write(tmp_path / "twice.jsonl", ok, ok))
    with pytest.raises(UserError, match="--jobs_file"):
        load_jobs(str(tmp_path / "missing.jsonl"))


def test_robustness_recipe_runs_the_baselines_with_their_cpu_settings(tmp_path):
    """MODES with the 2024 baselines and FT_ARGS: every purification job gets the extra flags, RA
    follows every mode, and a dry run ends without trying to tabulate results that do not exist."""
    lines = _dry("robustness_fmnist.sh", tmp_path, ATTACKS="badnet", MODES="ep nc fst", QRA="0",
                 FT_ARGS="--nc_epochs 5 --anp_iterations 300")
    by_name = {line.split("] ", 1)[1].split(":", 1)[0]: line for line in lines}
    for mode in ("ep", "nc", "fst"):
        assert f"--ft_mode {mode} --nc_epochs 5 --anp_iterations 300" in by_name[f"badnet-{mode}"]
        assert f"badnet-{mode}-ra5" in by_name and f"badnet-{mode}-ra20" in by_name
    assert not any(name.endswith("-qra") for name in by_name)


def test_baseline_checks_recipe_tags_every_check_and_puts_the_long_ones_first(tmp_path):
    lines = _dry("baseline_checks_fmnist.sh", tmp_path, LONG_ATTACKS="badnet", CLP_US="2 1")
    by_name = {line.split("] ", 1)[1].split(":", 1)[0]: line for line in lines}
    names = list(by_name)
    assert names[:4] == ["attack-badnet-0.1", "attack-blended-0.1", "badnet-anp-official", "badnet-nc-e10"]
    assert "--anp_curve true --tag official" in by_name["badnet-anp-official"] and "--anp_iterations" not in by_name["badnet-anp-official"]
    assert "--ft_mode nc --nc_epochs 10 --epochs 10 --tag e10" in by_name["badnet-nc-e10"]
    assert "--ft_mode i-bau --tag official" in by_name["badnet-i-bau-official"]
    # the comparison's own reduced runs, untagged, as references on the same victim
    assert "--ft_mode i-bau --split_ratio 0.02" in by_name["badnet-i-bau"] and "--tag" not in by_name["badnet-i-bau"]
    assert "--ft_mode nc --nc_epochs 2 --epochs 10" in by_name["badnet-nc"]
    assert not any(n.startswith("blended-") and n.split("-", 1)[1] in ("anp-official", "nc-e10", "i-bau", "nc")
                   for n in names)
    assert names[-2:] == ["badnet-i-bau_official-ra5", "badnet-anp_official-ra5"]
    assert "--defense_type i-bau_official --poison_num 5" in by_name["badnet-i-bau_official-ra5"]
    for attack in ("badnet", "blended"):
        assert "--anp_iterations 100 --anp_curve true --tag curve" in by_name[f"{attack}-anp-curve"]
        assert [n for n in names if n.startswith(f"{attack}-clp")] == [f"{attack}-clp", f"{attack}-clp-u2", f"{attack}-clp-u1"]
        assert "--clp_u 1 --tag u1" in by_name[f"{attack}-clp-u1"]
    tags = [line.split("--tag ")[-1].split()[0] for line in lines if "--tag " in line and "ft.py" in line]
    assert sorted(tags) == sorted(["official", "e10", "official"] + ["curve", "u2", "u1"] * 2)


def test_baseline_checks_recipe_refuses_an_official_attack_it_does_not_train(tmp_path):
    full = {**os.environ, "RECORD_ROOT": str(tmp_path), "SWEEP_ARGS": "--dry_run", "PYTHON": sys.executable,
            "ATTACKS": "badnet", "LONG_ATTACKS": "blended"}
    proc = subprocess.run(["bash", "sh/baseline_checks_fmnist.sh"], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: LONG_ATTACKS: blended is not in ATTACKS"
