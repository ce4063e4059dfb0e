"""`python -m utils.bench`, kept for the documented commands: see `utils.tools.bench`."""
from utils.tools.bench import main
from utils.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
