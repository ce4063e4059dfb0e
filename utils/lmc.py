"""`python -m utils.lmc`: linear mode connectivity of a record's purified models, see `utils.analysis.lmc`."""
from utils.analysis.lmc import main
from utils.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
