"""`python -m utils.robustness_table`, kept for the documented commands: see `utils.robustness.table`."""
from utils.errors import run_cli
from utils.robustness.table import main

if __name__ == "__main__":
    run_cli(main)
