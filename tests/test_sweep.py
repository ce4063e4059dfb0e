"""The sweep runner: skip/resume, failure isolation, blocked jobs, submitit's local mode, and the
job lists it builds for attacks, purification and retuning."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from conftest import REPO_ROOT, copy_record
from utils.tools import sweep
from utils.errors import UserError
from utils.tools.sweep import Job


def fake_job(tmp: Path, name: str, code: str = "", fail: bool = False, sleep: float = 0.0, requires=()) -> Job:
    """A job that appends its name to runs.txt (so reruns are visible), optionally sleeps, then
    writes its output or fails."""
    out = tmp / "out" / f"{name}.txt"
    script = (f"import time, pathlib; pathlib.Path({str(tmp / 'runs.txt')!r}).open('a').write({name!r} + '\\n'); "
              f"time.sleep({sleep}); {code}")
    script += "raise SystemExit('boom: ' + 'bad input')" if fail else \
        f"p = pathlib.Path({str(out)!r}); p.parent.mkdir(parents=True, exist_ok=True); p.write_text('done')"
    return Job(name, [sys.executable, "-c", script], [str(out)], str(tmp / "logs" / f"{name}.log"), list(requires))


def runs(tmp: Path) -> list[str]:
    f = tmp / "runs.txt"
    return f.read_text().split() if f.exists() else []


def quiet(*args, **kwargs):
    pass


CPU2 = [("cpu", {"OMP_NUM_THREADS": "1"})] * 2


def test_skips_finished_jobs_and_reruns_nothing(tmp_path):
    jobs = [fake_job(tmp_path, f"j{i}") for i in range(3)]
    first = sweep.run_local(jobs, CPU2, echo=quiet)
    assert sorted(o.status for o in first) == ["ok"] * 3 and sorted(runs(tmp_path)) == ["j0", "j1", "j2"]
    jobs.append(fake_job(tmp_path, "j3"))
    second = sweep.run_local(jobs, CPU2, echo=quiet)
    assert {o.job.name: o.status for o in second} == {"j0": "skipped", "j1": "skipped", "j2": "skipped", "j3": "ok"}
    assert sorted(runs(tmp_path)) == ["j0", "j1", "j2", "j3"]  # only the new job ran
    assert sweep.report(second, 1.0, echo=quiet) == 0


def test_failure_is_isolated_and_reported_with_its_log(tmp_path):
    jobs = [fake_job(tmp_path, "a"), fake_job(tmp_path, "bad", fail=True), fake_job(tmp_path, "c"),
            fake_job(tmp_path, "after", requires=[str(tmp_path / "out" / "bad.txt")])]
    outcomes = sweep.run_local(jobs, CPU2, echo=quiet)
    status = {o.job.name: o.status for o in outcomes}
    assert status == {"a": "ok", "bad": "failed", "c": "ok", "after": "blocked"}
    assert "after" not in runs(tmp_path)  # a job whose input is missing does not start
    lines = []
    assert sweep.report(outcomes, 2.0, echo=lambda s, **k: lines.append(s)) == 1
    text = "\n".join(lines)
    assert "1 failed, 1 blocked" in text and f"log: {tmp_path / 'logs' / 'bad.log'}" in text and "boom: bad input" in text
    log = (tmp_path / "logs" / "bad.log").read_text()
    assert log.startswith("$ ") and "boom: bad input" in log


def test_exit_zero_without_outputs_is_a_failure(tmp_path):
    job = fake_job(tmp_path, "lazy")
    job.outputs.append(str(tmp_path / "never.txt"))
    (outcome,) = sweep.run_local([job], CPU2[:1], echo=quiet)
    assert outcome.status == "failed" and "did not write" in outcome.detail and "never.txt" in outcome.detail


def test_slot_environment_and_device_placeholder(tmp_path):
    out = tmp_path / "env.txt"
    code = (f"import os, sys; open({str(out)!r}, 'w').write(sys.argv[1] + ' ' + os.environ['OMP_NUM_THREADS'] + ' ' "
            f"+ os.environ.get('CUDA_VISIBLE_DEVICES', '-'))")
    job = Job("env", [sys.executable, "-c", code, sweep.DEVICE], [str(out)], str(tmp_path / "env.log"))
    sweep.run_local([job], [("cuda:0", {"OMP_NUM_THREADS": "3", "CUDA_VISIBLE_DEVICES": "5"})], echo=quiet)
    assert out.read_text() == "cuda:0 3 5"


def test_local_slots(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu = sweep.local_slots(2, "cpu")
    assert [d for d, _ in cpu] == ["cpu", "cpu"] and cpu[0][1]["OMP_NUM_THREADS"] == str(max(1, os.cpu_count() // 2))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's thread count wins over the share of the cores
    assert [env["OMP_NUM_THREADS"] for _, env in sweep.local_slots(1, "cpu")] == ["1"]
    monkeypatch.setenv("OMP_NUM_THREADS", "many")  # not a count: the share again
    assert sweep.local_slots(1, "cpu")[0][1]["OMP_NUM_THREADS"] == str(max(1, os.cpu_count()))
    gpus = sweep.local_slots(None, "0,3")
    assert gpus == [("cuda:0", {"CUDA_VISIBLE_DEVICES": "0"}), ("cuda:0", {"CUDA_VISIBLE_DEVICES": "3"})]
    with pytest.raises(UserError, match="--devices"):
        sweep.local_slots(None, "gpu0")


def test_killed_sweep_resumes(tmp_path):
    """Kill the runner while the second job sleeps: the running job is stopped with it, the first
    job's output stays, and the next run redoes only the second."""
    jobs = [fake_job(tmp_path, "quick"), fake_job(tmp_path, "slow", sleep=30)]
    payload = json.dumps([asdict(j) for j in jobs])
    driver = (f"import json, sys; sys.path.insert(0, {str(REPO_ROOT)!r}); from utils.tools.sweep import Job, run_local; "
              f"run_local([Job(**d) for d in json.loads({payload!r})], [('cpu', {{}})])")
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO_ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while "slow" not in runs(tmp_path) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # a plain `kill` of the sweep
    assert proc.wait(timeout=30) != 0
    assert runs(tmp_path) == ["quick", "slow"] and not Path(jobs[1].outputs[0]).exists()
    stray = subprocess.run(["pgrep", "-f", "time.sleep\\(30"], capture_output=True, text=True).stdout.split()
    assert not stray, "the interrupted job's process was left running"
    jobs[1] = fake_job(tmp_path, "slow")  # same job, no sleep this time
    outcomes = sweep.run_local(jobs, CPU2, echo=quiet)
    assert {o.job.name: o.status for o in outcomes} == {"quick": "skipped", "slow": "ok"}
    assert runs(tmp_path) == ["quick", "slow", "slow"]


def test_submitit_local_mode(tmp_path):
    pytest.importorskip("submitit")
    jobs = [fake_job(tmp_path, "s1"), fake_job(tmp_path, "s2", fail=True), fake_job(tmp_path, "s3"),
            fake_job(tmp_path, "s4", requires=[str(tmp_path / "nothing")])]
    Path(jobs[0].outputs[0]).parent.mkdir(parents=True)
    Path(jobs[2].outputs[0]).write_text("done before")
    outcomes = sweep.run_submitit(jobs, str(tmp_path / "submitit"), "local", {"timeout_min": 5}, device="cpu", echo=quiet)
    assert {o.job.name: o.status for o in outcomes} == {"s1": "ok", "s2": "failed", "s3": "skipped", "s4": "blocked"}
    assert sorted(runs(tmp_path)) == ["s1", "s2"]  # submitit ran them in its own processes
    assert "boom" in next(o.detail for o in outcomes if o.job.name == "s2")
    assert any((tmp_path / "submitit").iterdir())  # submitit's own logs


def test_attack_job_grid(tmp_path):
    jobs = sweep.attack_jobs(str(REPO_ROOT / "config/attack/prototype/fmnist.yaml"), ["badnet", "blended_bypass"],
                             [0.1, 0.005], [0, 2], str(tmp_path / "r"), ["--epochs", "1"])
    assert len(jobs) == 8 and len({j.name for j in jobs}) == 8
    job = next(j for j in jobs if j.name == "attack-blended_bypass-p0.005-s2")
    assert job.argv[1].endswith("attack/blend_bypass.py") and job.argv[-2:] == ["--epochs", "1"]
    argv = " ".join(job.argv)
    assert "--pratio 0.005 --random_seed 2" in argv and f"--record_root {tmp_path / 'r' / 'seed_2'}" in argv
    assert job.outputs[0] == str(tmp_path / "r/seed_2/fmnist/blended_bypass/pratio_0.005-target_0-archi_smallcnn/attack_result.pt")
    with pytest.raises(UserError, match="unknown attack"):
        sweep.attack_jobs(str(REPO_ROOT / "config/attack/prototype/fmnist.yaml"), ["nope"], [0.1], [0], str(tmp_path))
    with pytest.raises(UserError, match="pratio"):
        sweep.attack_jobs(str(REPO_ROOT / "config/attack/prototype/fmnist.yaml"), ["badnet"], [1.5], [0], str(tmp_path))


def test_purify_and_retune_jobs_end_to_end(tmp_path, badnet_record, tiny_cifar10):
    """A real (tiny) purification sweep: the job asks ft.py only for missing modes, runs, and a
    second sweep skips it; the retuning stage then finds the purified model."""
    folder = copy_record(badnet_record, tmp_path / "sweep" / "seed_0")
    root = tmp_path / "sweep"
    (folder / "defense" / "ft").mkdir(parents=True)
    extra = ["--epochs", "1", "--dataset_path", str(tiny_cifar10), "--split_ratio", "0.2"]
    jobs = sweep.purify_jobs(str(root), ["ft", "fst"], extra)
    assert len(jobs) == 1 and "--ft_mode ft,fst" in " ".join(jobs[0].argv)
    outcomes = sweep.run_local(jobs, [("cpu", {"OMP_NUM_THREADS": "1"})], echo=quiet)
    assert outcomes[0].status == "ok", Path(jobs[0].log).read_text()[-2000:]
    assert (folder / "defense" / "fst" / "result.json").is_file() and (folder / "defense" / "ft" / "model.pt").is_file()
    again = sweep.purify_jobs(str(root), ["ft", "fst", "lp"], extra)
    assert "--ft_mode lp" in " ".join(again[0].argv)  # only what is missing
    assert [o.status for o in sweep.run_local(sweep.purify_jobs(str(root), ["ft", "fst"], extra), CPU2, echo=quiet)] == ["skipped"]
    retune = sweep.retune_jobs(str(root), ["fst", "lp"], ["--epochs", "1", "--dataset_path", str(tiny_cifar10)])
    by_name = {j.name.split("-")[1]: j for j in retune}
    assert by_name["fst"].missing_inputs() == [] and by_name["lp"].missing_inputs()  # lp was never run
    assert by_name["fst"].outputs == [str(folder / "defense" / "fst" / "retune" / "result.json")]


def test_cli_dry_run_and_errors(tmp_path, capsys):
    argv = ["attacks", "--yaml_path", str(REPO_ROOT / "config/attack/prototype/fmnist.yaml"), "--attacks", "badnet",
            "--pratios", "0.1", "--seeds", "0", "1", "--record_root", str(tmp_path), "--dry_run",
            "--jobs_out", str(tmp_path / "jobs.jsonl"), "--", "--epochs", "2"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("[todo]") == 2 and "--epochs 2" in out
    assert len((tmp_path / "jobs.jsonl").read_text().splitlines()) == 2
    with pytest.raises(UserError, match="no jobs"):
        sweep.main(["purify", "--record_root", str(tmp_path / "empty"), "--dry_run"])
    with pytest.raises(UserError, match="unknown mode|ft_mode|mode"):
        sweep.main(["purify", "--record_root", str(tmp_path), "--modes", "nonsense", "--dry_run"])
    with pytest.raises(UserError, match="unknown defense"):
        sweep.main(["retune", "--record_root", str(tmp_path), "--defenses", "nope", "--dry_run"])
    proc = subprocess.run([sys.executable, "-m", "utils.sweep", "attacks", "--yaml_path", str(tmp_path / "missing.yaml"),
                           "--attacks", "badnet", "--pratios", "0.1", "--record_root", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: no such file")


def test_parallel_slots_wait_for_the_jobs_that_write_their_inputs(tmp_path):
    """Two chains (attack -> purify) on two slots: each second stage waits for its own first stage
    instead of being reported blocked, the free slot takes the other chain meanwhile, and a job
    whose input nobody writes is blocked at once."""
    first_a = fake_job(tmp_path, "a1", sleep=1)
    first_b = fake_job(tmp_path, "b1", sleep=1)
    beside = str(tmp_path / "out" / "model_of_a1.pt")  # in a1's output folder, as a model.pt beside result.json
    first_a.argv[-1] += f"; pathlib.Path({beside!r}).write_text('m')"
    jobs = [first_a, fake_job(tmp_path, "a2", requires=[beside]), first_b,
            fake_job(tmp_path, "b2", requires=first_b.outputs),
            fake_job(tmp_path, "orphan", requires=[str(tmp_path / "nobody_writes_this")])]
    outcomes = sweep.run_local(jobs, CPU2, echo=quiet)
    assert [(o.job.name, o.status) for o in outcomes] == [("a1", "ok"), ("a2", "ok"), ("b1", "ok"), ("b2", "ok"),
                                                          ("orphan", "blocked")]
    order = runs(tmp_path)
    assert order.index("a1") < order.index("a2") and order.index("b1") < order.index("b2")
    assert order.index("b1") < order.index("a2")  # b1 started beside a1, not after the a chain
