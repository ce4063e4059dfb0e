"""`python -m utils.results`, kept for the documented commands: see `utils.analysis.results`."""
from utils.analysis.results import main
from utils.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
