"""One configuration system for the record commands: ft.py, ft_poison.py and qra.py take their
settings from the Option schema, with an optional `--yaml_path` layer under the flags, and the YAML
files under config/defense/ and config/robustness/ state the defaults they claim."""
from __future__ import annotations

from pathlib import Path

import pytest

from utils.commands import finetune
from utils.config import load_yaml
from utils.defenses.purify import ALL_MODES
from utils.errors import UserError
from utils.robustness import qra, retune

ROOT = Path(__file__).resolve().parents[1]
RECORD = ["--dataset", "cifar10", "--attack", "badnet", "--model", "smallcnn"]


def test_every_mode_has_a_yaml_and_it_states_the_defaults():
    for name in ALL_MODES:
        path = ROOT / "config" / "defense" / f"{name}.yaml"
        assert path.is_file(), f"no config/defense/{name}.yaml"
        from_yaml = finetune.mode_args(finetune.parse_args([*RECORD, "--yaml_path", str(path)]), name)
        default = finetune.mode_args(finetune.parse_args([*RECORD, "--ft_mode", name]), name)
        keys = load_yaml(path, finetune.options())
        assert keys["ft_mode"] == name
        for key in keys:
            assert getattr(from_yaml, key) == getattr(default, key), f"{path.name}: {key}"


@pytest.mark.parametrize("module,name", [(retune, "retune"), (qra, "qra")])
def test_robustness_yamls_state_the_defaults(module, name):
    path = ROOT / "config" / "robustness" / f"{name}.yaml"
    keys = load_yaml(path, module.options())
    from_yaml = module.parse_args([*RECORD, "--yaml_path", str(path)])
    default = module.parse_args(RECORD)
    for key, value in keys.items():
        expected = getattr(default, key)
        if name == "retune" and expected is None:  # the shared split's values when none are given
            expected = {"random_seed": retune.SHARED_SEED, "split_ratio": retune.SHARED_SPLIT_RATIO}[key]
        assert getattr(from_yaml, key) == value == expected, key


def test_flags_win_over_the_yaml_and_the_yaml_over_defaults(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("epochs: 3\nlr: 0.5\nsave: false\nft_mode: lp\n")
    args = finetune.parse_args([*RECORD, "--yaml_path", str(path), "--lr", "0.1"])
    assert (args.epochs, args.lr, args.save, args.ft_mode) == (3, 0.1, False, "lp")
    assert args.yaml_path == str(path)
    bare = finetune.parse_args([*RECORD, "--save", "--log"])  # bare switches keep their meaning
    assert bare.save is True and bare.log is True and finetune.parse_args(RECORD).log is False


@pytest.mark.parametrize("text,message", [
    ("epoch: 3\n", "unknown key(s) epoch; valid keys:"),
    ("epochs: three\n", "epochs must be an integer, got 'three'"),
    ("norm_proj: most\n", "norm_proj must be one of all, fst, none"),
    ("overwrite: true\n", "unknown key(s) overwrite"),  # replacing results stays a deliberate flag
    ("- a\n", "expected a mapping"),
    ("split_ratio: 0\n", "split_ratio must be within (0, 1], got 0.0"),
    ("bti_unet_width: 0\n", "bti_unet_width must be positive, got 0"),
])
def test_bad_yaml_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        finetune.parse_args([*RECORD, "--yaml_path", str(path)])


def test_missing_yaml_and_bad_flag_values_are_errors(tmp_path):
    with pytest.raises(UserError, match="settings YAML"):
        finetune.parse_args([*RECORD, "--yaml_path", str(tmp_path / "none.yaml")])
    with pytest.raises(UserError, match="--epochs must be an integer"):
        retune.parse_args([*RECORD, "--epochs", "x"])
    with pytest.raises(UserError, match="generator_input must be one of"):
        qra.parse_args([*RECORD, "--generator_input", "raw"])


def test_mode_settings_come_from_the_mode_registry():
    names = [o.name for o in finetune.options()]
    assert len(names) == len(set(names)), "an option listed twice"
    for mode in ALL_MODES.values():
        for opt in mode.options:
            assert opt.name in names, f"{mode.name}'s {opt.name} is not a flag of ft.py"
    assert {o.name for o in ALL_MODES["ft-sam"].options} >= {"sam_rho", "sam_adaptive", "ft_sam_preset"}
    assert {o.name for o in ALL_MODES["pam"].options} >= {"pam_rho", "rounds", "bti_unet_width"}
    assert not ALL_MODES["fst"].options


@pytest.mark.parametrize("module,flag,value,message", [
    (finetune, "--momentum", "1", "--momentum must be within [0, 1), got 1.0"),
    (finetune, "--eval_every", "0", "--eval_every must be positive, got 0"),
    (finetune, "--wd", "-1", "--wd must be 0 or positive, got -1.0"),
    (retune, "--poison_num", "-1", "--poison_num must be 0 or positive, got -1"),
    (qra, "--eps", "300", "--eps must be within (0, 255], got 300.0"),
    (qra, "--eval_batch_size", "-2", "--eval_batch_size must be 0 or positive, got -2"),
])
def test_ranges_are_checked_by_the_schema(module, flag, value, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        module.parse_args([*RECORD, flag, value])


def test_tiny_imagenet_gets_backdoorbenchs_tiny_settings_and_flags_still_win():
    """BackdoorBench's config/defense/<method>/tiny.yaml where it differs from cifar10.yaml."""
    def settle(dataset, mode, *extra):
        return finetune.mode_args(finetune.parse_args(["--dataset", dataset, "--attack", "badnet", "--model", "smallcnn",
                                                       *extra]), mode)
    for mode in ("fp", "nc"):
        cifar, tiny = settle("cifar10", mode), settle("tiny", mode)
        assert (cifar.epochs, cifar.lr_schedule) == (100, None)  # None: the phase's own (cosine)
        assert (tiny.epochs, tiny.lr_schedule) == (200, "plateau")
        assert finetune.settings_for(tiny).schedule == "plateau" and finetune.settings_for(cifar).schedule == ""
        assert settle("tiny", mode, "--lr_schedule", "cosine", "--epochs", "20").lr_schedule == "cosine"
    assert settle("cifar10", "nad").batch_size == 256 and settle("tiny", "nad").batch_size == 128
    assert settle("gtsrb", "clp").clp_u == 3.0 and settle("tiny", "clp").clp_u == 5.0
    assert settle("tiny", "clp", "--clp_u", "4").clp_u == 4.0
    assert finetune.settings_for(settle("tiny", "clp")).extra["clp_u"] == 5.0
    # the FST modes keep the dataset table of the paper
    assert (settle("tiny", "fst").epochs, settle("tiny", "fst").lr_schedule) == (15, None)


def test_ignored_settings_are_the_given_ones_a_mode_does_not_read():
    args = finetune.parse_args([*RECORD, "--epochs", "3", "--lr", "0.1", "--alpha", "0.2", "--lr_schedule", "plateau"])
    assert finetune.ignored_settings(args, "fst") == []
    assert finetune.ignored_settings(args, "ft") == ["alpha"]
    assert finetune.ignored_settings(args, "anp") == ["epochs", "lr_schedule", "alpha"]
    assert finetune.ignored_settings(args, "clp") == ["epochs", "lr", "lr_schedule", "alpha"]
    assert finetune.ignored_settings(args, "i-bau") == ["lr_schedule", "alpha"]
    # nothing given, nothing said; a mode's own defaults are not "given"
    plain = finetune.parse_args(RECORD)
    assert all(finetune.ignored_settings(plain, m) == [] for m in ("anp", "clp", "i-bau", "ft", "nad"))
