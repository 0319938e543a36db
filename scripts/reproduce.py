"""Reproduce a published table: ``python scripts/reproduce.py TABLE [--rows a,b] [--device cpu|gpu]``.

TABLE is a name in configs/reproduce/ (omniglot, omniglot_cpu, sinusoid) or the path of a table YAML. Each row
runs as a normal run in OUT/<table>/<row>/ (train.py, or eval.py of an earlier row's checkpoint); a finished row
is kept, an interrupted one continues from its last.ckpt, so the same command finishes a table in pieces. Then
OUT/<table>/report.md and report.html compare each row with the paper: published figure, ours +- 95% CI, the
difference, whether the intervals overlap, steps, training time, device, commit, and validation curves.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metalstm.startup import default_ctrl_c, stop_quietly_on_ctrl_c  # noqa: E402

stop_quietly_on_ctrl_c()  # exit 130, no traceback

from metalstm.errors import MetalstmError  # noqa: E402
from metalstm.reproduce import load_table, run_table, update_readme, write_reproduction_report  # noqa: E402


def main() -> None:
    default_ctrl_c()  # a row's Ctrl-C is handled in run_child: the row saves its checkpoint first
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", help="a table name in configs/reproduce/, or a table YAML")
    parser.add_argument("--rows", help="comma-separated row ids to run (default: all)")
    parser.add_argument("--device", choices=("cpu", "gpu"), help="trainer=cpu|gpu for every row (default: auto)")
    parser.add_argument("--data-root", default="data/omniglot", help="data.root of rows that read data")
    parser.add_argument("--out", type=Path, default=Path("outputs/reproduce"), help="where row folders go")
    parser.add_argument("--report-only", action="store_true", help="write the report from the rows run so far")
    parser.add_argument("--readme", type=Path, help="also put the summary table into this file, between the "
                        "<!-- reproduce:TABLE --> and <!-- /reproduce:TABLE --> lines")
    parser.add_argument("overrides", nargs="*", help="key=value for every training row, e.g. trainer.max_steps=100 (a trial)")
    args = parser.parse_intermixed_args()
    code = 0
    try:
        table = load_table(args.table)
        out = args.out.resolve() / table.name
        if not args.report_only:
            code = run_table(table, out, args.rows.split(",") if args.rows else None,
                             str(Path(args.data_root).expanduser().resolve()), args.device, args.overrides)
        written = write_reproduction_report(table, out)
        if args.readme:
            update_readme(args.readme, table, out)
    except MetalstmError as e:
        print(f"metalstm error: {e}", file=sys.stderr)
        sys.exit(2)
    for kind, path in written.items():
        print(f"{kind:>6}: {path}")
    sys.exit(code)


if __name__ == "__main__":
    main()
