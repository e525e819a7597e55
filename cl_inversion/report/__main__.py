"""The command line: `python -m cl_inversion.report <run or sweep dir>... [--out DIR] [--format latex]
[--keep-newest]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cl_inversion.report.files import report
from cl_inversion.report.runs import PROG
from cl_inversion.report.tables import _dropped_lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cl_inversion.report",
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("dirs", nargs="+", help="run or sweep directories (searched recursively for results.json)")
    parser.add_argument("--out", help="output directory (default: <first dir>/report)")
    parser.add_argument("--format", choices=("markdown", "latex"), default="markdown",
                        help="table printed on stdout: markdown (default) or a booktabs LaTeX tabular")
    parser.add_argument("--keep-newest", action="store_true",
                        help="where one config and seed was run more than once, keep the newest results.json "
                             "(by its recorded end time, else its modification time) instead of failing")
    args = parser.parse_args(argv)
    result = report(args.dirs, args.out, keep_newest=args.keep_newest)
    for line in _dropped_lines(result["dropped"]):
        print(f"{PROG}: --keep-newest: {line}", file=sys.stderr)
    summary = (f"{len(result['rows'])} rows, {len(result['failed'])} failed/incomplete; written to {result['out']}: "
               f"report.md, report.tex, report.csv, runs.csv, {len(result['plots'])} plots")
    if args.format == "latex":
        print(result["latex"] + "% " + summary)
    else:
        print(result["markdown"])
        print(summary)
    return 1 if not result["rows"] and not result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
