"""Sweeps: grids of attack, purification and retuning jobs, run resumably.

A job is one command line, the files it leaves when it has finished (`outputs`), the files it needs
(`requires`) and its log. A sweep is a list of jobs; running it again skips every job whose outputs
exist, so a killed sweep resumes where it stopped (an attack also resumes from its last epoch, the
scripts themselves checkpoint). A failed job never stops the others; the end report names each
failure with its log.

Where jobs run:
- `local` (default): a pool of worker slots on this machine, one job per slot. With GPUs, one slot per
  GPU (`CUDA_VISIBLE_DEVICES` set per job, the job sees `cuda:0`); on a CPU, `--workers` processes
  sharing the cores (`OMP_NUM_THREADS` = cores / workers).
- `submitit`: the same job list handed to submitit (SLURM on a cluster, `--cluster local` runs the
  jobs as local processes through submitit's own local executor, `debug` in this process). submitit
  is an optional dependency: `pip install submitit`.

Command line (the `sh/` scripts call it; `--dry_run` prints the job list with what is done):

    python -m utils.sweep attacks --yaml_path config/attack/prototype/fmnist.yaml --attacks badnet blended \\
        --pratios 0.1 0.01 --seeds 0 1 2 --record_root record/sweep
    python -m utils.sweep purify --record_root record/sweep --modes all -- --epochs 10 --eval_every 5
    python -m utils.sweep retune --record_root record/sweep --defenses fst ft

Records of seed s live under <record_root>/seed_<s>/ (the record path itself has no seed), and each
record is purified with tuning seed s (the victim and its purification vary together per repetition).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import models
from utils.attacks.registry import ATTACKS, get_attack
from utils.data.datasets import DATASETS
from utils.errors import UserError, run_cli
from utils.defenses.purify import ALL_MODES, parse_modes
from utils.record.layout import CONFIG_FILE, MODEL_FILE, RECORD_FILE, RESULT_FILE, SUMMARY_FILE, defense_folder, format_pratio, logs_folder, record_name, resources_folder, retune_folder, source_folder
from utils.config import INT_LIMIT, REPO_ROOT, ArgumentParser, folder_path, parse_bool, read_yaml, short, tag as tag_problem
from utils.record.lock import FolderLock, LockHeld, held_message, holder_of

DEVICE = "{device}"  # placeholder in a job's argv, replaced by the slot's device when it starts
SCRIPTS = {"blended_bypass": "blend_bypass"}  # attack name -> attack/<script>.py where they differ


@dataclass
class Job:
    name: str
    argv: list[str]
    outputs: list[str]
    log: str
    requires: list[str] = field(default_factory=list)

    def done(self) -> bool:
        return all(Path(p).is_file() for p in self.outputs)

    def missing_inputs(self) -> list[str]:
        return [p for p in self.requires if not Path(p).exists()]


@dataclass
class Outcome:
    job: Job
    status: str          # skipped (done before) | ok | failed | blocked | held (another run writes its output)
    seconds: float = 0.0
    detail: str = ""


# --- job lists ---------------------------------------------------------------------------------

def attack_jobs(yaml_path: str, attacks: list[str], pratios: list[float], seeds: list[int], record_root: str,
                extra: list[str] = (), model: str | None = None, target: int | None = None) -> list[Job]:
    """One job per attack x pratio x seed: attack/<attack>.py with the prototype; seed s writes its
    record under <record_root>/seed_<s>/."""
    proto = _read_yaml(yaml_path)
    dataset = proto.get("dataset")
    model = model or proto.get("model")
    target = proto.get("attack_target", 0) if target is None else target
    if not dataset or not model:
        raise UserError(f"{yaml_path}: the prototype must name a dataset and a model")
    # the names become folder names of the outputs: registry names only
    if dataset not in DATASETS:
        raise UserError(f"{yaml_path}: dataset {short(dataset)} is not one of: {', '.join(DATASETS)}")
    if not models.is_model_name(model):
        raise UserError(f"model {short(model)} is not one of: {', '.join(models.model_names())}")
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target <= INT_LIMIT:
        raise UserError(f"attack_target must be an integer, 0 or positive, got {short(target)}")
    jobs = []
    for attack in attacks:
        get_attack(attack)  # a registered name, never a path: `--attacks ../../x` runs nothing
        script = REPO_ROOT / "attack" / f"{SCRIPTS.get(attack, attack)}.py"
        if not script.is_file():
            raise UserError(f"attack {attack!r} has no entry script {script.relative_to(REPO_ROOT)}")
        for pratio in pratios:
            if not 0.0 <= pratio < 1.0:
                raise UserError(f"pratio must be within [0, 1), got {pratio}")
            for seed in seeds:
                root = Path(record_root) / f"seed_{seed}"
                folder = root / dataset / attack / record_name(pratio, target, model)
                argv = [sys.executable, str(script), "--yaml_path", yaml_path, "--pratio", format_pratio(pratio),
                        "--random_seed", str(seed), "--record_root", str(root), "--resource_root",
                        str(resources_folder(record_root)), "--model", model, "--attack_target", str(target),
                        "--device", DEVICE, "--progress", "false", *extra]
                jobs.append(Job(f"attack-{attack}-p{format_pratio(pratio)}-s{seed}", argv,
                                [str(folder / RECORD_FILE), str(folder / SUMMARY_FILE)],
                                str(logs_folder(record_root) / f"attack-{attack}-p{format_pratio(pratio)}-s{seed}.log")))
    return jobs


#: what a record's config.yaml must hold for the sweep to build commands from it, and the types
_RECORD_KEYS = {"attack": str, "dataset": str, "model": str, "pratio": (int, float), "attack_target": int}


def find_records(record_root: str) -> list[tuple[Path, dict]]:
    """Every attack record below `record_root` (at any depth), with its config.yaml. A record whose
    config.yaml is unreadable or lacks what the jobs need stops the sweep with one error naming the
    file: skipping it would leave that record out of every table without a word."""
    found = []
    for marker in sorted(Path(record_root).rglob(RECORD_FILE)):
        folder = marker.parent
        if any(part.startswith(".") for part in folder.relative_to(record_root).parts):
            continue  # a record still being written (StagedFolder's .partial folders)
        cfg = _read_yaml(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
        if "attack" in cfg:
            _check_record_config(folder / CONFIG_FILE, cfg)
            found.append((folder, cfg))
    return found


def _check_record_config(path: Path, cfg: dict) -> None:
    hint = "repair it or move the record folder out of the sweep root"
    for key, kind in _RECORD_KEYS.items():
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise UserError(f"{path}: {key} is {short(value)}, not a record's value; {hint}")
    seed = cfg.get("random_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= INT_LIMIT:
        raise UserError(f"{path}: random_seed is {short(seed)}, not a seed; {hint}")
    if not 0 <= cfg["pratio"] <= 1 or cfg["attack_target"] < 0:
        raise UserError(f"{path}: pratio {short(cfg['pratio'])} or attack_target {short(cfg['attack_target'])} "
                        f"out of range; {hint}")
    for key in ("attack", "dataset", "model"):
        if not cfg[key] or "/" in cfg[key] or "\\" in cfg[key] or cfg[key].startswith("."):
            raise UserError(f"{path}: {key} {short(cfg[key])} is not a plain name; {hint}")


def _select(records, attacks, pratios, seeds):
    for folder, cfg in records:
        if attacks and cfg["attack"] not in attacks:
            continue
        if pratios and not any(abs(float(cfg["pratio"]) - p) < 1e-9 for p in pratios):
            continue
        if seeds and int(cfg.get("random_seed", 0)) not in seeds:
            continue
        yield folder, cfg


def _record_flags(folder: Path, cfg: dict) -> list[str]:
    root = folder.parents[2]
    return ["--record_root", str(root), "--dataset", cfg["dataset"], "--model", cfg["model"], "--attack", cfg["attack"],
            "--pratio", format_pratio(cfg["pratio"]), "--attack_target", str(cfg["attack_target"])]


def _short(cfg: dict) -> str:
    return f"{cfg['attack']}-p{format_pratio(cfg['pratio'])}-s{cfg.get('random_seed', 0)}"


def purify_jobs(record_root: str, modes: list[str], extra: list[str] = (), tag: str = "", attacks=None, pratios=None,
                seeds=None, logs: str | None = None) -> list[Job]:
    """One ft.py job per record for the modes it still lacks (so one process loads the record once);
    tuning seed = the record's seed."""
    jobs = []
    logs = Path(logs or logs_folder(record_root))
    for folder, cfg in _select(find_records(record_root), attacks, pratios, seeds):
        wanted = [m for m in modes if not (defense_folder(folder, m, tag) / RESULT_FILE).is_file()] or modes
        argv = [sys.executable, str(REPO_ROOT / "fine_tune" / "ft.py"), *_record_flags(folder, cfg), "--ft_mode", ",".join(wanted),
                "--random_seed", str(cfg.get("random_seed", 0)), "--device", DEVICE, "--progress", "false", *extra]
        if tag:
            argv += ["--tag", tag]
        name = f"purify-{_short(cfg)}" + (f"-{tag}" if tag else "")
        jobs.append(Job(name, argv, [str(defense_folder(folder, m, tag) / RESULT_FILE) for m in modes],
                        str(logs / f"{name}.log"), [str(folder / RECORD_FILE)]))
    return jobs


def retune_jobs(record_root: str, defenses: list[str], extra: list[str] = (), tag: str = "", attacks=None, pratios=None,
                seeds=None, logs: str | None = None) -> list[Job]:
    """One fine_tune/ft_poison.py job per record and defense (`none`: the unpurified model)."""
    jobs = []
    logs = Path(logs or logs_folder(record_root))
    for folder, cfg in _select(find_records(record_root), attacks, pratios, seeds):
        for defense in defenses:
            source = source_folder(folder, defense)
            out = retune_folder(source, tag) / RESULT_FILE
            needs = [str(folder / RECORD_FILE)] + ([] if defense == "none" else [str(source / MODEL_FILE)])
            argv = [sys.executable, str(REPO_ROOT / "fine_tune" / "ft_poison.py"), *_record_flags(folder, cfg), "--defense_type",
                    defense, "--device", DEVICE, "--progress", "false", *extra] + (["--tag", tag] if tag else [])
            name = f"retune-{defense}-{_short(cfg)}" + (f"-{tag}" if tag else "")
            jobs.append(Job(name, argv, [str(out)], str(logs / f"{name}.log"), needs))
    return jobs


def _read_yaml(path) -> dict:
    """A YAML mapping, read as settings files are (bounded size, no aliases; one error line)."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys to values")
    return data


# --- running ---------------------------------------------------------------------------------

def local_slots(workers: int | None, devices: str = "auto") -> list[tuple[str, dict]]:
    """(device, extra environment) per worker: one per visible GPU when there are GPUs and the
    device is auto/cuda, else `workers` CPU processes sharing the cores (OMP_NUM_THREADS = cores /
    workers, unless OMP_NUM_THREADS is set: then each process gets that many)."""
    if devices in ("auto", "cuda"):
        gpus = _gpu_count()
        if gpus:
            n = min(workers or gpus, gpus)
            return [("cuda:0", {"CUDA_VISIBLE_DEVICES": str(i)}) for i in range(n)]
        if devices == "cuda":
            raise UserError("--devices cuda: no CUDA GPU is visible")
        devices = "cpu"
    if devices == "cpu":
        n = workers or 1
        given = os.environ.get("OMP_NUM_THREADS", "")
        # the user's OMP_NUM_THREADS wins (e.g. fewer threads beside other work); else the cores are shared
        threads = int(given) if given.isdigit() and int(given) > 0 else max(1, (os.cpu_count() or 1) // n)
        return [("cpu", {"OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}) for _ in range(n)]
    ids = [d.strip() for d in devices.split(",") if d.strip()]  # explicit GPU ids, e.g. 0,1,3
    if not all(i.isdigit() for i in ids):
        raise UserError(f"--devices must be auto, cpu, cuda or GPU ids like 0,1; got {short(devices)}")
    return [("cuda:0", {"CUDA_VISIBLE_DEVICES": i}) for i in ids]


def _gpu_count() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch / broken driver: run on CPUs
        return 0


#: execute's exit status for a job whose output folder another run holds (EX_TEMPFAIL): not started
HELD = 75


def held_by_other_run(job: Job) -> str:
    """The lock line of the first output folder of `job` that a live run holds, else ''. Such a job
    is not started (its log, which the other run may be writing, stays untouched)."""
    for out in job.outputs:
        folder = Path(out).parent
        holder = holder_of(folder)
        if holder is not None:
            return held_message(folder, holder)
    return ""


def _status(rc: int) -> str:
    return "ok" if rc == 0 else "held" if rc == HELD else "failed"


def execute(job: Job, device: str, env: dict | None = None, running: dict | None = None) -> tuple[int, str]:
    """Run one job now, output to its log; returns (exit status, one-line detail); `HELD` when
    another run writes the job's output now, or another sweep (on the same root) runs the same
    job. `running`, when given, holds the job's process while it runs (so an interrupted sweep can
    stop it). Module-level so that submitit can pickle it by reference."""
    # The sweep claims the job (a lock beside its log) before it touches the log: a second sweep
    # would otherwise truncate the log the first one's job is writing, in the seconds before the
    # job's own script takes the lock of its output folder.
    claim = FolderLock(Path(job.log), "job log")
    try:
        claim.acquire()
    except LockHeld as err:
        return HELD, str(err)
    try:
        if job.done():
            return 0, ""  # finished by another sweep between our look and our claim
        held = held_by_other_run(job)
        if held:
            return HELD, held
        return _execute(job, device, env, running)
    finally:
        claim.release()


def _execute(job: Job, device: str, env: dict | None, running: dict | None) -> tuple[int, str]:
    log = Path(job.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [device if a == DEVICE else a for a in job.argv]
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    with open(log, "w") as out:
        out.write(f"$ {shlex.join(argv)}\n")
        out.flush()
        # its own process group, so that stopping it also stops anything it started
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=full_env, start_new_session=True)
        if running is not None:
            running[job.name] = proc
        try:
            rc = proc.wait()
        except BaseException:
            _stop(proc)
            raise
        finally:
            if running is not None:
                running.pop(job.name, None)
    if rc == 0 and not job.done():
        missing = [p for p in job.outputs if not Path(p).is_file()]
        return 1, f"exited 0 but did not write {missing[0]}"
    return rc, "" if rc == 0 else f"exit status {rc}: {_last_line(log)}"


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _last_line(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if len(lines) > 1 else ""


def _triage(jobs: list[Job]) -> tuple[list[Outcome], list[Job]]:
    before, todo = [], []
    for job in jobs:
        (before.append(Outcome(job, "skipped")) if job.done() else todo.append(job))
    return before, todo


def run_local(jobs: list[Job], slots: list[tuple[str, dict]], echo=print) -> list[Outcome]:
    """Run the unfinished jobs, one per slot at a time, in the list's order as far as their inputs
    allow: a job whose `requires` another unfinished job of the list writes (one of its outputs, or a
    file in the folder of one) waits for that job, and the free slot takes the next ready job, so
    `--workers 2` runs independent chains side by side. A job whose input is missing and will not
    come (no job of the list writes it, or its writer ended without it) is `blocked`, not run.
    Outcomes come back in the list's order. Only this thread schedules; the pool runs the jobs."""
    done_before, todo = _triage(jobs)
    index = {id(job): i for i, job in enumerate(jobs)}
    # who writes what: a job's outputs, and (as a job writes its output folder whole, e.g. a
    # purification's result.json with its model.pt) any other file of the folders they are in
    producers: dict[str, list[Job]] = {}
    for job in todo:
        for out in job.outputs:
            for key in {os.path.abspath(out), os.path.dirname(os.path.abspath(out)) + os.sep}:
                producers.setdefault(key, []).append(job)
    finished: dict[int, Outcome] = {}   # id(job) -> its outcome, for the jobs of `todo`
    free = list(range(len(slots)))
    running: dict[str, subprocess.Popen] = {}

    def waits_for(job: Job) -> tuple[list[Job], str | None]:
        """(unfinished jobs writing a missing input, the first input that will never come)."""
        pending = []
        for path in job.missing_inputs():
            path = os.path.abspath(path)
            writers = producers.get(path) or producers.get(os.path.dirname(path) + os.sep, [])
            writers = [w for w in writers if w is not job]
            if all(id(w) in finished for w in writers):  # none, or each ended without writing it
                return [], path
            pending += [w for w in writers if id(w) not in finished]
        return pending, None

    def one(job: Job, slot: int) -> Outcome:
        device, env = slots[slot]
        if job.done():
            return Outcome(job, "skipped")
        echo(f"-> {job.name} on {device}{' (GPU ' + env['CUDA_VISIBLE_DEVICES'] + ')' if env.get('CUDA_VISIBLE_DEVICES') else ''}"
             f"   log: {job.log}", flush=True)
        start = time.perf_counter()
        rc, detail = execute(job, device, env, running)
        seconds = time.perf_counter() - start
        status = _status(rc)
        echo(f"{'ok' if rc == 0 else status.upper()} {job.name} ({seconds:.0f} s){'' if rc == 0 else ': ' + detail}", flush=True)
        return Outcome(job, status, seconds, detail)

    queue = list(todo)
    active: dict = {}  # future -> (job, slot)
    pool = ThreadPoolExecutor(max_workers=len(slots))
    with _sigterm_as_interrupt():
        try:
            while queue or active:
                progressed = True
                while progressed and queue:
                    progressed = False
                    for job in list(queue):
                        pending, never = waits_for(job)
                        if never is not None:
                            queue.remove(job)
                            echo(f"-- {job.name}: blocked, missing {never}")
                            finished[id(job)] = Outcome(job, "blocked", detail=f"missing {never}")
                            progressed = True
                        elif not pending and free:
                            queue.remove(job)
                            slot = free.pop(0)
                            active[pool.submit(one, job, slot)] = (job, slot)
                            progressed = True
                if not active:
                    # nothing runs and nothing can start: the rest wait on each other (a cycle)
                    for job in queue:
                        finished[id(job)] = Outcome(job, "blocked", detail="its inputs depend on each other")
                    queue.clear()
                    break
                done, _ = wait(list(active), return_when=FIRST_COMPLETED)
                for future in done:
                    job, slot = active.pop(future)
                    free.append(slot)
                    finished[id(job)] = future.result()
        except KeyboardInterrupt:
            # Ctrl-C or kill: stop the running jobs (their partial outputs stay staged, so the next
            # sweep redoes or resumes them) instead of waiting for them
            for proc in list(running.values()):
                _stop(proc)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    pool.shutdown()
    return sorted(done_before + list(finished.values()), key=lambda o: index[id(o.job)])


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Within the main thread, SIGTERM (plain `kill`) and SIGHUP stop the sweep like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run_submitit(jobs: list[Job], folder: str, cluster: str | None, parameters: dict, device: str = "auto",
                 echo=print) -> list[Outcome]:
    """Hand the unfinished jobs to submitit as one job array and wait for them. `cluster` None lets
    submitit choose (SLURM where sbatch exists, else local processes)."""
    try:
        import submitit
    except ImportError:
        raise UserError("--executor submitit needs submitit: pip install submitit") from None
    outcomes, todo = _triage(jobs)
    blocked = [j for j in todo if j.missing_inputs()]
    outcomes += [Outcome(j, "blocked", detail=f"missing {j.missing_inputs()[0]}") for j in blocked]
    todo = [j for j in todo if j not in blocked]
    if not todo:
        return outcomes
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**parameters)
    dev = "cpu" if device == "cpu" else ("cuda:0" if executor.cluster == "slurm" or device == "cuda" else _auto_device())
    start = time.perf_counter()
    submitted = executor.map_array(execute, todo, [dev] * len(todo))
    echo(f"submitted {len(submitted)} jobs to submitit ({executor.cluster}); its logs: {folder}", flush=True)
    for job, handle in zip(todo, submitted):
        try:
            rc, detail = handle.result()
        except Exception as err:  # noqa: BLE001 - the cluster job itself died; keep collecting the others
            rc, detail = 1, f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        status = _status(rc)
        echo(f"{'ok' if rc == 0 else status.upper()} {job.name}{'' if rc == 0 else ': ' + detail}", flush=True)
        outcomes.append(Outcome(job, status, time.perf_counter() - start, detail))
    return outcomes


def _auto_device() -> str:
    return "cuda:0" if _gpu_count() else "cpu"


def report(outcomes: list[Outcome], seconds: float, echo=print) -> int:
    """Print the end report; exit status 1 when any job failed, was blocked or was held by another run."""
    count = {s: sum(o.status == s for o in outcomes) for s in ("skipped", "ok", "failed", "blocked", "held")}
    echo(f"sweep: {len(outcomes)} jobs in {seconds / 60:.1f} min: {count['ok']} ran, {count['skipped']} done before (skipped), "
         f"{count['failed']} failed, {count['blocked']} blocked"
         + (f", {count['held']} held by another run (not started)" if count["held"] else ""))
    for o in outcomes:
        if o.status in ("failed", "blocked"):
            echo(f"  {o.status.upper()} {o.job.name}: {o.detail}\n    log: {o.job.log}")
        elif o.status == "held":
            echo(f"  HELD {o.job.name}: {o.detail}")
    return 1 if count["failed"] or count["blocked"] or count["held"] else 0


# --- command line ------------------------------------------------------------------------------

def _bool_flag(text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected true or false, got {short(text)}") from None


def build_parser() -> argparse.ArgumentParser:
    """The sweep's flags. List flags take values separated by spaces, commas or both; every
    boolean flag alone means true and also takes true/false; every help line states its default."""
    p = ArgumentParser(prog="python -m utils.sweep", description="Run a grid of attack / purification / retuning jobs, "
                       "resumably (finished jobs are skipped), locally or through submitit.")
    sub = p.add_subparsers(dest="stage", required=True)
    common = ArgumentParser(add_help=False)
    c = common.add_argument
    c("--record_root", required=True, help="root of the sweep's records (seed s under <root>/seed_<s>/); required")
    c("--attacks", nargs="+", default=None, help="attack names (purify/retune: filter; default all found)")
    c("--pratios", nargs="+", default=None, help="poisoning ratios in [0, 1) (attacks: required; purify/retune: "
      "filter, default all)")
    c("--seeds", nargs="+", default=None, help="seeds (attacks: default 0; purify/retune: filter, default all)")
    c("--executor", choices=("local", "submitit"), default="local", help="run here (default) or through submitit")
    c("--workers", default=None, help="local: parallel jobs (default: one per GPU, else 1)")
    c("--devices", default="auto", help="local: auto (GPUs if any, else CPU), cpu, cuda, or GPU ids like 0,1 "
      "(default auto)")
    c("--cluster", default=None, help="submitit: slurm, local or debug (default: submitit's choice)")
    c("--submitit_params", default="{}", help="submitit: JSON of executor parameters, e.g. "
      "'{\"timeout_min\": 240, \"slurm_partition\": \"gpu\", \"gpus_per_node\": 1, \"slurm_array_parallelism\": 16}' "
      "(default {})")
    c("--dry_run", nargs="?", const=True, default=False, type=_bool_flag, metavar="true|false",
      help="print the jobs (done or to do) and their commands as they would run; run nothing (default false)")
    c("--jobs_out", default=None, help="also write the job list as JSON lines (for any other scheduler; default: none)")
    a = sub.add_parser("attacks", parents=[common], help="attack x pratio x seed victims").add_argument
    a("--yaml_path", required=True, help="prototype YAML (dataset and training recipe); required")
    a("--model", default=None, help="model (default: the prototype's)")
    a("--attack_target", default=None, help="target label (default: the prototype's)")
    f = sub.add_parser("purify", parents=[common], help="ft.py on every record: modes x records").add_argument
    f("--modes", nargs="+", default=["all"], help="all (the five FST modes), or a list of modes (default all)")
    f("--tag", default="", help="ft.py --tag (default: none)")
    r = sub.add_parser("retune", parents=[common], help="the retuning attack (ft_poison.py) on purified models").add_argument
    r("--defenses", nargs="+", default=["fst"], help="defense types, `none` for the unpurified model (default fst)")
    r("--tag", default="", help="ft_poison.py --tag (default: none)")
    j = sub.add_parser("jobs", parents=[common], help="a prepared job list (the sh/ recipes use it)").add_argument
    j("--jobs_file", required=True, help="JSON lines, one job per line with name, argv, outputs, log and optionally "
      "requires (what --jobs_out writes); '-' reads standard input. Jobs run in the file's order on each slot; required")
    return p


def _items(values: list[str] | None) -> list[str] | None:
    """A list flag's values, split at commas too: `--modes ft fst`, `--modes ft,fst`, `--modes ft, fst`."""
    if values is None:
        return None
    return [piece for v in values for piece in v.replace(",", " ").split()]


def _numbers(flag: str, values: list[str] | None, kind, low, high, what: str) -> list | None:
    """A numeric list flag, each value finite and within [low, high]."""
    out = []
    for text in _items(values) or []:
        try:
            value = kind(text)
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"{flag} takes {what}, got {short(text)}") from None
        if not (low <= value <= high):  # False for nan, too
            raise UserError(f"{flag} takes {what}, got {short(text)}")
        out.append(value)
    return out if values is not None else None


def _settle(args: argparse.Namespace) -> None:
    """Convert and check every flag before any job is built: names against their registries,
    numbers finite and in range."""
    problem = folder_path(args.record_root)
    if problem:  # empty: seed_<s>/, logs/ and resources/ would land in the working directory
        raise UserError(f"--record_root {problem}, got {short(args.record_root)}")
    args.attacks = _items(args.attacks)
    for attack in args.attacks or []:
        get_attack(attack)
    args.pratios = _numbers("--pratios", args.pratios, float, 0.0, 1.0, "poisoning ratios within [0, 1]")
    args.seeds = _numbers("--seeds", args.seeds, int, 0, INT_LIMIT, "seeds, integers within [0, 2**63 - 1]")
    workers = _numbers("--workers", None if args.workers is None else [args.workers], int, 1, 4096,
                       "a positive integer (at most 4096)")
    args.workers = workers[0] if workers else None
    if getattr(args, "model", None) is not None and not models.is_model_name(args.model):
        raise UserError(f"--model {short(args.model)} is not one of: {', '.join(models.model_names())}")
    if getattr(args, "attack_target", None) is not None:
        args.attack_target = _numbers("--attack_target", [args.attack_target], int, 0, INT_LIMIT,
                                      "a class index, 0 or positive")[0]
    if getattr(args, "tag", ""):
        problem = tag_problem(args.tag)
        if problem:
            raise UserError(f"--tag {problem}, got {short(args.tag)}")
    if getattr(args, "modes", None) is not None:
        args.modes = parse_modes(" ".join(_items(args.modes)))
    if getattr(args, "defenses", None) is not None:
        args.defenses = _items(args.defenses)
        for d in args.defenses:
            if d != "none" and d not in ALL_MODES:
                raise UserError(f"unknown defense {short(d)}: none or one of {', '.join(ALL_MODES)}")


def _printed_command(job: Job, slot: tuple[str, dict]) -> str:
    """The job's command as its slot would run it: the device filled in, the slot's environment
    in front, shell-quoted so that it can be pasted."""
    device, env = slot
    argv = [device if a == DEVICE else a for a in job.argv]
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    return f"{prefix} {shlex.join(argv)}" if prefix else shlex.join(argv)


def load_jobs(path: str) -> list[Job]:
    """Jobs from JSON lines; every line is checked before anything runs."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as err:
        raise UserError(f"--jobs_file {path}: {err.strerror or err}") from None
    jobs, names = [], set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected an object with name, argv, outputs, log")
        missing = [k for k in ("name", "argv", "outputs", "log") if k not in data]
        unknown = sorted(set(data) - {"name", "argv", "outputs", "log", "requires"})
        if missing or unknown:
            raise UserError(f"{where}: " + (f"missing {', '.join(missing)}" if missing else f"unknown key(s) {', '.join(unknown)}"))
        lists = ("argv", "outputs", "requires")
        if not isinstance(data["name"], str) or not isinstance(data["log"], str) or any(
                not isinstance(data.get(k, []), list) or not all(isinstance(v, str) for v in data.get(k, [])) for k in lists):
            raise UserError(f"{where}: name and log must be strings; argv, outputs and requires lists of strings")
        if not data["argv"] or not data["outputs"]:
            raise UserError(f"{where}: argv and outputs must not be empty (outputs say when the job is done)")
        if data["name"] in names:
            raise UserError(f"{where}: job name {short(data['name'])} used twice")
        names.add(data["name"])
        jobs.append(Job(data["name"], data["argv"], data["outputs"], data["log"], data.get("requires", [])))
    return jobs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:  # everything after -- goes to each job's script
        cut_at = argv.index("--")
        argv, extra = argv[:cut_at], argv[cut_at + 1:]
    args = build_parser().parse_args(argv)
    _settle(args)
    if args.stage == "attacks":
        if not args.attacks or not args.pratios:
            raise UserError("attacks: give --attacks and --pratios")
        jobs = attack_jobs(args.yaml_path, args.attacks, args.pratios, args.seeds or [0], args.record_root, extra,
                           args.model, args.attack_target)
    elif args.stage == "purify":
        jobs = purify_jobs(args.record_root, args.modes, extra, args.tag, args.attacks, args.pratios, args.seeds)
    elif args.stage == "jobs":
        jobs = load_jobs(args.jobs_file)
    else:
        jobs = retune_jobs(args.record_root, args.defenses, extra, args.tag, args.attacks, args.pratios, args.seeds)
    if not jobs:
        raise UserError(f"no jobs: nothing under {args.record_root} matches" if args.stage in ("purify", "retune") else "no jobs")
    params = {}
    if args.executor == "submitit":
        try:
            params = json.loads(args.submitit_params)
        except json.JSONDecodeError as err:
            raise UserError(f"--submitit_params is not valid JSON: {err}") from None
        if not isinstance(params, dict):
            raise UserError(f"--submitit_params must be a JSON object, got {short(params)}")
    if args.jobs_out:
        Path(args.jobs_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.jobs_out).write_text("".join(json.dumps(asdict(j)) + "\n" for j in jobs))
    if args.dry_run:
        slots = local_slots(args.workers, args.devices) if args.executor == "local" else \
            [("cpu" if args.devices == "cpu" else _auto_device(), {})]
        for i, job in enumerate(jobs):
            print(f"[{'done' if job.done() else 'todo'}] {job.name}: {_printed_command(job, slots[i % len(slots)])}")
        return 0
    start = time.perf_counter()
    if args.executor == "local":
        outcomes = run_local(jobs, local_slots(args.workers, args.devices))
    else:
        outcomes = run_submitit(jobs, str(Path(args.record_root) / "submitit"), args.cluster, params,
                                "cpu" if args.devices == "cpu" else "auto")
    return report(outcomes, time.perf_counter() - start)


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
