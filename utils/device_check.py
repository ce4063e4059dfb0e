"""`python -m utils.device_check`, the documented command: see `utils.tools.device_check`."""
import sys

from utils.tools.device_check import main
from utils.errors import run_cli

if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
