"""Run an ablation grid (every variant x seed; finished runs skipped, cut ones resumed) and write its
table (mean +- std of the last epoch, next to the source documents' figures) and plots.

    python scripts/run_grid.py configs/ablations/<grid>.yaml --seeds 3 [--runs-dir runs/grid] [--only V ...] [--report-only] [--jobs N]

See uda/grid.py for the grid file's format.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from uda.cli import run_main  # noqa: E402
from uda.grid import main  # noqa: E402

if __name__ == "__main__":
    run_main(main)
