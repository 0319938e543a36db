"""Compare runs: ``python scripts/compare_runs.py outputs/multirun/<date>/<time> [more folders] [--out DIR]``.

Writes to DIR (default: <first folder>/report): runs.md and runs.csv (one row per run: the config keys that
differ, test metrics with their 95% CI), seeds.md and seeds.csv (mean +- 95% CI over seeds, for runs that
differ only in ``seed``), curves.png and final.png, and report.html, one self-contained page with all of it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metalstm.startup import stop_quietly_on_ctrl_c  # noqa: E402

stop_quietly_on_ctrl_c()  # exit 130, no traceback

from metalstm.errors import MetalstmError  # noqa: E402
from metalstm.report import write_report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="run folders, or sweep folders holding runs")
    parser.add_argument("--out", type=Path, help="where the report goes (default: <first folder>/report)")
    args = parser.parse_args()
    try:
        written = write_report(args.folders, args.out or args.folders[0] / "report")
    except MetalstmError as e:
        print(f"metalstm error: {e}", file=sys.stderr)
        sys.exit(2)
    for kind, path in written.items():
        print(f"{kind:>6}: {path}")


if __name__ == "__main__":
    main()
