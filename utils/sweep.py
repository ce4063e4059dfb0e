"""`python -m utils.sweep`, kept for the documented commands: see `utils.tools.sweep`."""
import sys

from utils.tools.sweep import main
from utils.errors import run_cli

if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
