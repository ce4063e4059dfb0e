"""Query-based reactivation attack (QRA) on a purified model.

    python fine_tune/qra.py --attack badnet --pratio 0.1 --attack_target 0 --model resnet18 --dataset cifar10 \
        --defense_type fst --device cuda:0

Needs the purified model (`fine_tune/ft.py ... --save`), its retuned version (`fine_tune/ft_poison.py`)
and a clean reference record (the attack run with `--pratio 0`, or `--clean_record <folder>`).
Results go to <record>/defense/<type>/qra[_<tag>]/ (or <record>/qra[_<tag>]/ for --defense_type none).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lets `python fine_tune/qra.py` find the package

from utils.errors import run_cli  # noqa: E402
from utils.robustness.qra import main  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
