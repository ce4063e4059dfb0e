"""Purify a backdoored model from a record by fine-tuning.

    python fine_tune/ft.py --attack badnet --split_ratio 0.02 --pratio 0.1 --device cuda:0 --lr 0.01 \
        --attack_target 0 --model resnet18 --dataset cifar10 --epochs 10 --ft_mode fst --alpha 0.1

Modes: ft, lp, fe-tuning, ft-init, fst, or all (runs the five and prints the comparison table).
Results go to record/<dataset>/<attack>/pratio_<p>-target_<t>-archi_<model>/defense/<mode>/.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lets `python fine_tune/ft.py` find the package

from utils.errors import run_cli  # noqa: E402
from utils.commands.finetune import main  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
