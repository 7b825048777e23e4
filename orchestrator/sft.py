"""`python -m raysft.orchestrator.sft ...`, the seed's module-style entry point."""

import sys

from raysft.orchestrator.cli import run_sft

if __name__ == "__main__":
    sys.exit(run_sft(sys.argv[1:]))
