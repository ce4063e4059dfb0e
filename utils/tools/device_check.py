"""Device check: does everything run on this machine, and how fast?

Every registered attack, then every registered purification mode, each for one short epoch through
its real entry script (`attack/<script>.py`, `fine_tune/ft.py`), then the throughput benchmark
(`python -m utils.bench`), on a data set generated on the spot in CIFAR-10's on-disk format (the
official python pickles), in a temporary folder. Prints one table: step, ok, seconds, images/s.

    python -m utils.device_check --device cuda:0 --size full --out docs/device_check
    bash sh/device_check.sh --device cuda:0            # the same, through the installer

`--size tiny` (100 training and 50 test images, the small CNN) is what the test suite runs on the
CPU; `--size full` (5,000 training and 1,000 test images, ResNet-18) is the first thing to run on a
GPU, and the default there. seconds is the wall time of the step's process (start-up and data loading included);
images/s is the training throughput: for an attack the training loop's own measure
(`train_img_per_s` of the record's summary), for a purification the tuning images times the epochs
over the mode's time (evaluation and trigger inversion included), for the benchmark its end-to-end
pipeline (the bare model step and the PIL pipeline in the note). A step that fails is a row with
ok = no and its last error line; the exit status is 1 when any row failed.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import models
from utils import engine
from utils.attacks.registry import ATTACKS
from utils.config import ArgumentParser, REPO_ROOT
from utils.defenses.purify import ALL_MODES
from utils.engine.runtime import device_name, versions
from utils.errors import UserError
from utils.record.layout import METRICS_FILE, RESULT_FILE, SUMMARY_FILE, defense_folder, record_path
from utils.record.store import write_json, write_text

DATASET = "cifar10"
PRATIO = 0.1
TARGET = 0


@dataclass(frozen=True)
class Size:
    train_per_batch: int  # five training batches, as CIFAR-10 has
    test: int
    model: str
    batch_size: int
    split_ratio: float    # of the training set, for the purification modes
    bench_images: int
    bench_rounds: int


SIZES = {
    "tiny": Size(train_per_batch=20, test=50, model="smallcnn", batch_size=32, split_ratio=0.2,
                 bench_images=64, bench_rounds=1),
    "full": Size(train_per_batch=1000, test=1000, model="resnet18", batch_size=128, split_ratio=0.05,
                 bench_images=3840, bench_rounds=3),
}

#: what makes each attack's extra work (surrogates, encoders, mask networks) short
ATTACK_FLAGS = {
    "lc": ["--surrogate_epochs", "1", "--surrogate_at_steps", "3", "--lc_steps", "3"],
    "lf": ["--surrogate_epochs", "1", "--lf_steps", "5"],
    "ssba": ["--ssba_steps", "20", "--ssba_batch_size", "16"],
    "inputaware": ["--mask_epochs", "1"],
}
TINY_ATTACK_FLAGS = {"inputaware": ["--net_width", "4"]}
#: one round of one epoch, and BTI-DBF's inversion at its shortest
MODE_FLAGS = {name: ["--rounds", "1", "--bti_pretrain_epochs", "1", "--bti_mask_epochs", "1", "--bti_gen_epochs", "1"]
              for name, mode in ALL_MODES.items() if mode.unlearn}
TINY_MODE_FLAGS = {name: ["--bti_unet_width", "4"] for name in MODE_FLAGS}
#: NAD's teacher and NC's trigger reversal (per class) at one epoch each
MODE_FLAGS.update({"nad": ["--nad_teacher_epochs", "1"], "nc": ["--nc_epochs", "1"]})
#: ANP: 50 mask-optimisation iterations instead of 2000 (the check is that it runs, not its numbers)
MODE_FLAGS["anp"] = ["--anp_iterations", "50"]


@dataclass
class Row:
    step: str
    ok: bool
    seconds: float
    img_per_s: float | None = None
    note: str = ""


# ----------------------------------------------------------------------------------------------
# the data


def write_cifar10(root: Path, size: Size, seed: int = 0) -> Path:
    """`root/cifar10/cifar-10-batches-py/{data_batch_1..5,test_batch}`: the official python pickles
    of a generated, learnable 10-class set (a colour per class, stripes whose direction and spacing
    depend on the class, noise). Returns `root`, the `--dataset_path`."""
    folder = root / DATASET / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, (10, 3, 1, 1)).astype(np.float32)
    coords = np.arange(32, dtype=np.float32)
    stripes = []
    for c in range(10):
        along = coords[None, :] if c % 2 else coords[:, None]
        stripes.append(np.broadcast_to(30 * np.sin(along * (0.3 + 0.15 * (c // 2))), (32, 32)))
    stripes = np.stack(stripes)[:, None]  # (10, 1, 32, 32)
    for name, n in [*((f"data_batch_{i}", size.train_per_batch) for i in range(1, 6)), ("test_batch", size.test)]:
        labels = rng.permutation(np.arange(n) % 10)
        images = colours[labels] + stripes[labels] + rng.normal(0, 10, (n, 3, 32, 32))
        data = np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3 * 32 * 32)
        with open(folder / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"labels": [int(y) for y in labels], b"data": data,
                         b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}, fh, protocol=2)
    return root


# ----------------------------------------------------------------------------------------------
# the steps


def attack_scripts() -> dict[str, Path]:
    """Registered attack name -> its entry script, read from the scripts (`run_attack("name")`)."""
    out = {}
    for script in sorted((REPO_ROOT / "attack").glob("*.py")):
        found = re.search(r"run_attack\(\s*[\"'](\w+)[\"']", script.read_text())
        if found:
            out[found.group(1)] = script
    return out


def _last_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (proc.stderr or "").splitlines() + (proc.stdout or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    err_lines = [line.strip() for line in (proc.stderr or "").splitlines() if line.strip()]
    text = errors[-1] if errors else (err_lines[-1] if err_lines else (lines[-1] if lines else f"exit {proc.returncode}"))
    return text[:300]


def run_step(step: str, argv: list[str], log_dir: Path, timeout: float | None) -> tuple[Row, subprocess.CompletedProcess | None]:
    """Run one step's process; its output goes to `log_dir/<step>.log`. A row with ok=False on a
    non-zero exit or a timeout."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return Row(step, False, round(time.perf_counter() - start, 2), note=f"timed out after {timeout:.0f} s"), None
    seconds = round(time.perf_counter() - start, 2)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / (re.sub(r"[^\w.-]+", "_", step) + ".log")).write_text(
        " ".join(argv) + "\n" + proc.stdout + ("\n--- stderr ---\n" + proc.stderr if proc.stderr else ""))
    if proc.returncode != 0:
        return Row(step, False, seconds, note=_last_error_line(proc)), proc
    return Row(step, True, seconds), proc


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def check_attack(name: str, script: Path | None, common: list[str], size_name: str, model: str, work: Path,
                 timeout: float | None) -> Row:
    if script is None:
        return Row(f"attack {name}", False, 0.0, note="no entry script in attack/ calls run_attack for it")
    extra = ATTACK_FLAGS.get(name, []) + (TINY_ATTACK_FLAGS.get(name, []) if size_name == "tiny" else [])
    row, _ = run_step(f"attack {name}", [sys.executable, str(script), *common, *extra], work / "logs", timeout)
    if row.ok:
        summary = _read_json(record_path(work / "record", DATASET, name, PRATIO, TARGET, model) / SUMMARY_FILE)
        row.img_per_s = summary.get("train_img_per_s")
        if summary.get("clean_acc") is not None:
            row.note = f"C-Acc {100 * summary['clean_acc']:.1f}  ASR {100 * summary['asr']:.1f}"
    return row


def check_mode(mode: str, attack: str | None, common: list[str], size_name: str, model: str, work: Path,
               timeout: float | None) -> Row:
    if attack is None:
        return Row(f"mode {mode}", False, 0.0, note="no attack record to purify (every attack step failed or none ran)")
    extra = MODE_FLAGS.get(mode, []) + (TINY_MODE_FLAGS.get(mode, []) if size_name == "tiny" else [])
    argv = [sys.executable, str(REPO_ROOT / "fine_tune" / "ft.py"), "--attack", attack, "--ft_mode", mode, *common, *extra]
    row, _ = run_step(f"mode {mode}", argv, work / "logs", timeout)
    if row.ok:
        out = defense_folder(record_path(work / "record", DATASET, attack, PRATIO, TARGET, model), mode)
        result = _read_json(out / RESULT_FILE)
        try:
            with open(out / METRICS_FILE, newline="") as fh:
                epochs = sum(1 for _ in csv.DictReader(fh))
        except OSError:
            epochs = 0
        if result.get("seconds") and result.get("tuning_size") and epochs:
            row.img_per_s = round(result["tuning_size"] * epochs / result["seconds"], 1)
        if isinstance(result.get("after"), dict):
            row.note = f"on {attack}: ASR {100 * result['before']['asr']:.1f} -> {100 * result['after']['asr']:.1f}"
    return row


def check_bench(common: list[str], size: Size, workers: int, timeout: float | None, work: Path) -> Row:
    argv = [sys.executable, "-m", "utils.bench", *common, "--images", str(size.bench_images),
            "--rounds", str(size.bench_rounds), "--batch_size", str(size.batch_size),
            "--workers", str(workers)]
    row, proc = run_step("bench", argv, work / "logs", timeout)
    if row.ok and proc is not None:
        try:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            row.img_per_s = result["e2e_img_s"]
            row.note = f"bare step {result['compute_img_s']:.0f} img/s, PIL+DataLoader {result['pil_img_s']:.0f} img/s"
        except (ValueError, KeyError, IndexError):
            row.ok, row.note = False, "bench printed no JSON result line"
    return row


# ----------------------------------------------------------------------------------------------
# the table


def markdown(rows: list[Row], header: dict) -> str:
    lines = [f"Device check on {header['device']}: {header['size']} size ({header['train_images']} training "
             f"images, model {header['model']}), torch {header['versions']['torch']}, {header['date']}", "",
             "| step | ok | seconds | images/s | note |", "|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r.img_per_s:.0f}" if isinstance(r.img_per_s, (int, float)) else "-"
        note = r.note.replace("|", "\\|")
        lines.append(f"| {r.step} | {'yes' if r.ok else 'no'} | {r.seconds:.1f} | {speed} | {note} |")
    failed = [r.step for r in rows if not r.ok]
    lines += ["", f"{len(rows) - len(failed)} of {len(rows)} steps ok" + (f"; failed: {', '.join(failed)}" if failed else "")]
    return "\n".join(lines)


def _names(given: list[str] | None, known: dict, what: str, flag: str) -> list[str]:
    if not given:
        return list(known)
    unknown = [n for n in given if n not in known]
    if unknown:
        raise UserError(f"{flag}: unknown {what} {', '.join(unknown)}; choose from: {', '.join(known)}")
    return list(dict.fromkeys(given))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m utils.device_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--size", default="auto", choices=("auto", *SIZES),
                   help="tiny (the suite's, for a CPU), full (for a GPU) or auto (default: full on CUDA, else tiny)")
    p.add_argument("--model", default="", help="architecture (default: smallcnn for tiny, resnet18 for full)")
    p.add_argument("--attacks", nargs="+", metavar="ATTACK", help="only these attacks (default: every registered one)")
    p.add_argument("--modes", nargs="+", metavar="MODE", help="only these purification modes (default: every registered one)")
    p.add_argument("--bench", default="true", choices=("true", "false"), help="run the benchmark at the end (default true)")
    p.add_argument("--out", default="", help="folder to write device_check.md and device_check.json into")
    p.add_argument("--work_dir", default="", help="keep the generated data, records and logs in this new or empty folder "
                                                  "(default: a temporary folder, removed at the end)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one step may take (default 1800; 0: no limit)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    attacks = _names(args.attacks, ATTACKS, "attack", "--attacks")
    modes = _names(args.modes, ALL_MODES, "mode", "--modes")
    if args.timeout < 0:
        raise UserError(f"--timeout must be 0 (no limit) or positive, got {args.timeout}")
    device = engine.resolve_device(args.device)
    if args.size == "auto":
        args.size = "full" if device.type == "cuda" else "tiny"
    size = SIZES[args.size]
    if args.model:
        if not models.is_model_name(args.model):
            raise UserError(f"unknown --model {args.model!r}; choose one of: {', '.join(models.model_names())}")
        size = Size(**{**asdict(size), "model": args.model})
    timeout = args.timeout or None
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    if args.work_dir and Path(args.work_dir).exists() and (not Path(args.work_dir).is_dir() or any(Path(args.work_dir).iterdir())):
        # the steps write records there and never replace one: a folder of an earlier check would fail them all
        raise UserError(f"--work_dir {args.work_dir} exists and is not an empty folder; give a new one")
    header = {"device": device_name(device), "size": args.size, "model": size.model,
              "train_images": 5 * size.train_per_batch, "test_images": size.test,
              "versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = write_cifar10(work / "data", size)
        dev = str(device)
        print(f"device check on {header['device']}: {len(attacks)} attacks, {len(modes)} modes"
              + (", benchmark" if args.bench == "true" else "") + f"; work folder {work}", flush=True)
        rows: list[Row] = []

        def done(row: Row) -> None:
            rows.append(row)
            print(f"{row.step}: {'ok' if row.ok else 'FAILED'} in {row.seconds:.1f} s"
                  + (f" ({row.note})" if row.note else ""), flush=True)

        common_attack = ["--yaml_path", "config/attack/prototype/cifar10.yaml", "--dataset_path", str(data),
                         "--download", "false", "--model", size.model, "--epochs", "1", "--device", dev,
                         "--batch_size", str(size.batch_size), "--pratio", str(PRATIO), "--attack_target", str(TARGET),
                         "--train_subset", "0", "--test_subset", "0", "--record_root", str(work / "record"),
                         "--resource_root", str(work / "resources"), "--progress", "false"]
        scripts = attack_scripts()
        for name in attacks:
            done(check_attack(name, scripts.get(name), common_attack, args.size, size.model, work, timeout))
        ok_attacks = [r.step.split(" ", 1)[1] for r in rows if r.ok]
        source = "badnet" if "badnet" in ok_attacks else (ok_attacks[0] if ok_attacks else None)
        common_mode = ["--dataset", DATASET, "--model", size.model, "--pratio", str(PRATIO), "--attack_target", str(TARGET),
                       "--record_root", str(work / "record"), "--dataset_path", str(data), "--device", dev,
                       "--epochs", "1", "--split_ratio", str(size.split_ratio), "--progress", "false"]
        for mode in modes:
            done(check_mode(mode, source, common_mode, args.size, size.model, work, timeout))
        if args.bench == "true":
            done(check_bench(["--dataset", DATASET, "--dataset_path", str(data), "--model", size.model, "--device", dev],
                             size, 0 if args.size == "tiny" else min(4, os.cpu_count() or 1), timeout, work))
    table = markdown(rows, header)
    print()
    print(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "device_check.md", table + "\n")
        write_json(out / "device_check.json", {**header, "rows": [asdict(r) for r in rows]})
        print(f"written: {out / 'device_check.md'}, {out / 'device_check.json'}")
    return 0 if all(r.ok for r in rows) else 1
