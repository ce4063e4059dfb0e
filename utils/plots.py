"""`python -m utils.plots`, kept for the documented commands: see `utils.analysis.plots`."""
from utils.analysis.plots import main
from utils.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
