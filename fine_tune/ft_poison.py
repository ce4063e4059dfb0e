"""Retuning attack (RA): fine-tune a purified model on its own tuning subset with a few poisoned samples.

    python fine_tune/ft_poison.py --dataset cifar10 --model resnet18 --attack badnet --pratio 0.1 \
        --defense_type fst --poison_num 5 --epochs 5 --lr 0.01 --device cuda:0

--defense_type names a folder under defense/ (purified with fine_tune/ft.py), `none` for the record's
own model (run it on a pratio-0 record for the clean reference), a comma-separated list, or all.
Results go to <record>/defense/<type>/retune/ (or <record>/retune/ for none).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lets `python fine_tune/ft_poison.py` find the package

from utils.errors import run_cli  # noqa: E402
from utils.robustness.retune import main  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
