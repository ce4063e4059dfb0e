"""utils/analysis/lmc.py (`python -m utils.lmc`): linear mode connectivity between the backdoored model and
its purified models. The interpolation is checked exactly at the parameter level, the BatchNorm
re-estimation against the statistics it must produce, and the curve's ends against the endpoint models:
with BatchNorm statistics kept (--bn_recompute false) t=0 and t=1 are exactly the numbers ft.py wrote
(result.json's before and after); with them recomputed, t=0 and t=1 are exactly the backdoored and the
purified model after the same re-estimation on the purification's tuning subset."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from conftest import REPO_ROOT, copy_record, flip_middle_byte, run_in_process
from utils import engine
from utils.analysis import lmc, plots, results
from utils.commands import finetune
from utils.data.datasets import dataset_info
from utils.defenses.purify import tuning_indices
from utils.errors import UserError
from utils.record.store import load_record, save_torch
from utils.victim.experiment import rebuild_experiment

pytest.importorskip("matplotlib")
PIL = pytest.importorskip("PIL.Image")


def _smallcnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return models.build_model("smallcnn", 10, 3, 32)


# --- the interpolation and the BatchNorm pass -------------------------------------------------------

def test_interpolation_is_exact_at_the_parameter_level():
    g = torch.Generator().manual_seed(0)
    start, end = ({k: v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
                   for k, v in _smallcnn(seed).state_dict().items()} for seed in (0, 1))
    counters = [k for k, v in start.items() if not v.is_floating_point()]
    assert counters and all(k.endswith("num_batches_tracked") for k in counters)
    for k in counters:
        start[k].fill_(5)
        end[k].fill_(9)
    at0, at1, mid = (lmc.interpolate_state(start, end, t) for t in (0.0, 1.0, 0.3))
    for key, a in start.items():
        b = end[key]
        assert torch.equal(at0[key], a) and torch.equal(at1[key], b if a.is_floating_point() else a), key
        if a.is_floating_point():
            assert torch.equal(mid[key], a * 0.7 + b * 0.3), key
            assert torch.allclose(mid[key], torch.lerp(a, b, 0.3), atol=1e-6), key
        else:
            assert torch.equal(mid[key], a) and mid[key].dtype == a.dtype, key  # counters are not interpolated
    assert all(not torch.equal(start[k], end[k]) for k in start)
    model = _smallcnn(2)
    model.load_state_dict(mid)  # the interpolated state is a whole state of the architecture
    with pytest.raises(UserError, match="different weights"):
        lmc.interpolate_state(start, {k: v for k, v in end.items() if k != counters[0]}, 0.5)
    bad = dict(end)
    first = next(iter(bad))
    bad[first] = torch.zeros(3)
    with pytest.raises(UserError, match="shape"):
        lmc.interpolate_state(start, bad, 0.5)


def test_batchnorm_statistics_are_reset_and_reestimated():
    model = _smallcnn(0)
    pipeline = engine.Pipeline.for_dataset(dataset_info("cifar10"), torch.device("cpu"))
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    bns = lmc.batchnorm_layers(model)
    assert bns
    first = bns[0]
    seen = {}
    first.register_forward_pre_hook(lambda m, inp: seen.setdefault("x", inp[0].detach().clone()))
    for m in bns:  # garbage statistics must not survive
        m.running_mean.fill_(7.0)
        m.running_var.fill_(3.0)
    momentum = first.momentum
    assert lmc.recompute_batchnorm(model, images, pipeline, batch_size=24) == len(bns)
    x = seen["x"].float()
    assert torch.allclose(first.running_mean, x.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(first.running_var, x.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
    assert int(first.num_batches_tracked) == 1 and first.momentum == momentum and not model.training
    # two batches: the cumulative average of the two batches' statistics, whatever came before
    seen.clear()
    batches = []
    first._forward_pre_hooks.clear()
    first.register_forward_pre_hook(lambda m, inp: batches.append(inp[0].detach().float().mean((0, 2, 3))))
    lmc.recompute_batchnorm(model, images, pipeline, batch_size=12)
    assert len(batches) == 2 and int(first.num_batches_tracked) == 2
    assert torch.allclose(first.running_mean, (batches[0] + batches[1]) / 2, atol=1e-5)


def test_barriers():
    curve = {"t": [0, 0.5, 1], "asr": [0.9, 0.95, 0.1], "clean_acc": [0.8, 0.5, 0.7],
             "clean_loss": [1.0, 3.0, 2.0], "backdoor_loss": [0.1, 0.1, 5.0]}
    b = lmc.barriers(curve)
    assert b["asr_barrier"] == pytest.approx(0.05) and b["clean_acc_barrier"] == pytest.approx(0.2)
    assert b["clean_loss_barrier"] == pytest.approx(1.5)  # 3.0 over the line's 1.5 at t=0.5
    assert b["backdoor_loss_barrier"] == pytest.approx(0.0)  # below the line: a low path back
    assert b["asr_mean"] == pytest.approx(0.65)
    with pytest.raises(UserError, match="at least 2"):
        lmc.t_grid(1)
    assert lmc.t_grid(3) == [0.0, 0.5, 1.0]


# --- on the BadNet record ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def purified(badnet_record, tiny_cifar10, tmp_path_factory) -> Path:
    """A copy of the session's BadNet record, purified with FT for one epoch on a 20% split."""
    root = tmp_path_factory.mktemp("lmc-record")
    folder = copy_record(badnet_record, root)
    finetune.main(["--dataset", "cifar10", "--dataset_path", str(tiny_cifar10), "--model", "smallcnn",
                   "--record_root", str(root), "--attack", "badnet", "--device", "cpu", "--ft_mode", "ft",
                   "--epochs", "1", "--split_ratio", "0.2", "--progress", "false"])
    return folder


def _endpoint_scores(folder: Path, data_root: Path, state: dict, tune: torch.Tensor) -> dict:
    """An endpoint model on its own, its BatchNorm statistics re-estimated on the tuning images."""
    record = load_record(folder)
    exp = rebuild_experiment(record, str(data_root), torch.device("cpu"))
    model = models.build_model(record["model_name"], 10, 3, 32)
    model.load_state_dict(state)
    model = engine.place_model(model, exp.pipeline, torch.device("cpu"))
    lmc.recompute_batchnorm(model, exp.clean_train.images[tune], exp.pipeline, 128)
    return lmc._scores(model, exp, 0, None)


def test_lmc_on_the_badnet_record(purified, tiny_cifar10, tmp_path, capsys):
    result = json.loads((purified / "defense" / "ft" / "result.json").read_text())
    written = lmc.main([str(purified), "--dataset_path", str(tiny_cifar10), "--device", "cpu", "--points", "3",
                        "--progress", "false"])
    png, js = purified / "figures" / "lmc.png", purified / "figures" / "lmc.json"
    assert written == [png, js] and capsys.readouterr().out.splitlines() == [f"wrote {png}", f"wrote {js}"]
    with PIL.open(png) as img:
        assert img.size[0] > 800 and img.size[1] > 300
    data = json.loads(js.read_text())
    assert data["batchnorm"]["recomputed"] and data["batchnorm"]["layers"] > 0 and "train mode" in data["batchnorm"]["how"]
    path = data["paths"]["ft"]
    assert list(data["paths"]) == ["ft"] and path["t"] == [0.0, 0.5, 1.0] and path["label"] == "FT"
    for key in ("clean_acc", "asr", "ra", "clean_loss", "backdoor_loss"):
        assert len(path[key]) == 3
    # the tuning subset is the purification's own
    assert path["tuning_size"] == result["tuning_size"] == 60 and path["tuning_digest"] == result["tuning_digest"]
    # the endpoint models with their own statistics: exactly what ft.py measured before and after
    for model, key in (("none", "before"), ("ft", "after")):
        assert {k: data["reference"][model][k] for k in ("clean_acc", "asr", "ra")} == result[key]
    # the ends of the path with statistics recomputed: the endpoint models after the same re-estimation
    record = load_record(purified)
    tune = tuning_indices(rebuild_experiment(record, str(tiny_cifar10), torch.device("cpu")).clean_train.labels, 0.2, 0)
    purified_state = torch.load(purified / "defense" / "ft" / "model.pt", weights_only=True)
    for i, state in ((0, record["model"]), (-1, purified_state)):
        ends = _endpoint_scores(purified, tiny_cifar10, state, tune)
        assert {k: path[k][i] for k in ends} == ends
    b = lmc.barriers(path)
    assert {k: path[k] for k in b} == b

    # without the re-estimation, the path's ends are exactly the two models ft.py measured
    out = tmp_path / "plain.png"
    lmc.main([str(purified), "--dataset_path", str(tiny_cifar10), "--device", "cpu", "--points", "2",
              "--bn_recompute", "false", "--out", str(out), "--modes", "ft", "--progress", "false"])
    plain = json.loads(out.with_suffix(".json").read_text())
    assert not plain["batchnorm"]["recomputed"]
    curve = plain["paths"]["ft"]
    for i, model in ((0, "none"), (1, "ft")):
        assert {k: curve[k][i] for k in ("clean_acc", "asr", "ra", "clean_loss", "backdoor_loss")} == \
            {k: plain["reference"][model][k] for k in ("clean_acc", "asr", "ra", "clean_loss", "backdoor_loss")}


# --- mistakes through the command line ---------------------------------------------------------------

def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run(args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "utils.lmc", *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)


def test_mistakes_are_one_error_line_and_change_nothing(purified, badnet_record, tiny_cifar10, tmp_path, capsys):
    bare = copy_record(badnet_record, tmp_path / "bare")  # no purification at all
    broken = copy_record(purified, tmp_path / "broken")
    shutil.rmtree(broken / "figures", ignore_errors=True)
    (broken / "defense" / "orphan").mkdir()  # weights without the result that names its tuning set
    shutil.copy(purified / "defense" / "ft" / "model.pt", broken / "defense" / "orphan" / "model.pt")
    state = torch.load(purified / "defense" / "ft" / "model.pt", weights_only=True)
    (broken / "defense" / "other").mkdir()  # weights of another architecture
    save_torch(broken / "defense" / "other" / "model.pt", {k: v for i, (k, v) in enumerate(state.items()) if i})
    shutil.copy(purified / "defense" / "ft" / "result.json", broken / "defense" / "other" / "result.json")
    (broken / "defense" / "damaged").mkdir()
    shutil.copy(purified / "defense" / "ft" / "model.pt", broken / "defense" / "damaged" / "model.pt")
    flip_middle_byte(broken / "defense" / "damaged" / "model.pt")
    data = ["--dataset_path", tiny_cifar10, "--device", "cpu"]
    before = {p: _snapshot(p) for p in (bare, broken)}
    # in the process (every UserError becomes one line through run_cli, shown below for three)
    cases = [
        ([broken, "--modes", "fst", *data], "no purified model at"),
        ([broken, "--modes", "none", *data], "not a defense"),
        ([broken, "--modes", "../x", *data], "--modes '../x' is not a folder name"),
        ([broken, "--modes", "orphan", *data], "the tuning set of orphan is unknown"),
        ([broken, "--modes", "other", *data], "different weights"),
        ([broken, "--modes", "damaged", *data], "damaged"),
        ([broken, "--modes", "ft", "--points", "1", *data], "at least 2 points"),
        ([broken, "--modes", "ft", "--bn_batch_size", "0", *data], "--bn_batch_size 0"),
        ([broken, "--modes", "ft", "--out", tmp_path / "x.jpg", *data], "must name a .png"),
        ([broken, "--modes", "ft", "--out", broken / "defense", *data], "must name a .png"),
        ([broken, "--modes", "ft", "--out", broken / "attack_result.pt" / "x.png", *data], "is a file, not a folder"),
        ([broken / "defense" / "ft", *data], "is not a record folder"),
        ([tmp_path / "nowhere", *data], "is not a record folder"),
    ]
    for args, wanted in cases:
        with pytest.raises(UserError, match=wanted.replace(".", r"\.")):
            lmc.main(list(map(str, args)))
    # as `python -m utils.lmc` runs: one `error:` line, exit 2, no traceback (the first in a real subprocess)
    proc = _run([bare, *data])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith("error: ") and "has no purified model" in proc.stderr
    for args, wanted in [([broken, "--modes", "ft", "--points", "many", *data], "argument --points: invalid int"),
                         ([broken, "--modes", "ft", "--dataset_path", tmp_path / "nodata", "--device", "cpu"], "not found")]:
        code, err = _as_cli(lmc.main, args, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and wanted in lines[0], err
    assert {p: _snapshot(p) for p in (bare, broken)} == before


def _as_cli(main, argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of an entry point run in this process as `python -m` runs it (run_cli)."""
    code, _, err = run_in_process(main, argv, capsys)
    return code, err


def test_the_other_analysis_commands_refuse_mistakes_in_one_line(badnet_record, tmp_path, capsys):
    """`python -m utils.plots opasr` and `python -m utils.results --layout 2024` (the first in a real subprocess)."""
    root = tmp_path / "root"
    copy_record(badnet_record, root)  # a record without any retuning result
    before = _snapshot(root)
    proc = subprocess.run([sys.executable, "-m", "utils.plots", "opasr", str(root)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith("error: no retuning results (retune/result.json")
    cases = [
        (plots.main, ["opasr", root, "--retune_tag", "p20"], "no retuning results (retune_p20/result.json"),
        (plots.main, ["opasr", tmp_path / "missing"], "does not exist"),
        (plots.main, ["opasr", root, "--out", badnet_record / "attack_result.pt"], "is a file"),
        (plots.main, ["opasr", root, "--pratio", "x"], "argument --pratio: invalid float value"),
        (plots.main, ["nope"], "argument command: invalid choice"),
        (results.main, [root, "--retune_tag", "p20"], "--retune_tag chooses the P- rows of --layout 2024"),
        (results.main, [root, "--layout", "2025"], "argument --layout: invalid choice"),
    ]
    for main, args, wanted in cases:
        code, err = _as_cli(main, args, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and wanted in lines[0], (args, err)
    assert _snapshot(root) == before and not (root / "figures").exists()
