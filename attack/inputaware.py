"""Train an Input-aware (inputaware) backdoored model and write a record.

    python attack/inputaware.py --yaml_path ../config/attack/prototype/cifar10.yaml [--bd_yaml_path ...] [--flag value ...]

Precedence: command-line flag > attack YAML (--bd_yaml_path) > prototype YAML (--yaml_path).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lets `python attack/x.py` find the package

from utils.errors import run_cli  # noqa: E402
from utils.victim.train import run_attack  # noqa: E402

if __name__ == "__main__":
    run_cli(lambda: run_attack("inputaware"))
