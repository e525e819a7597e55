"""`make bench`: run every benchmark and write its JSON to benchmarks/results/<name>.json.

Each benchmark is a module `benchmarks.<name>` whose last stdout line is one JSON object; it runs in
its own process (`python -m benchmarks.<name> --quick`) so one benchmark's global state (threads,
deterministic mode) cannot touch another's. A benchmark whose module is absent is skipped; one that
fails is reported and makes the exit status non-zero, after the others ran.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
BENCHMARKS = {  # name -> arguments
    "loop_overhead": ["--quick"],
    "inversion_speed": ["--quick"],
    "synthesis_speed": ["--quick"],
    "covariance_memory": ["--quick"],
}


def write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the benchmark's output")


def run_one(name: str, args: list[str], results_dir: Path) -> dict | None:
    if importlib.util.find_spec(f"benchmarks.{name}") is None:
        print(f"[bench] {name}: skipped (benchmarks/{name}.py is absent)", flush=True)
        return None
    print(f"[bench] {name}: python -m benchmarks.{name} {' '.join(args)}", flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT.parent), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=ROOT.parent, env=env,
                          stdout=subprocess.PIPE, text=True)  # stderr (progress) streams through
    if proc.returncode != 0:
        raise RuntimeError(f"{name} exited {proc.returncode} (its stderr is above)")
    result = last_json(proc.stdout)
    write_atomic(results_dir / f"{name}.json", result)
    print(f"[bench] {name}: {json.dumps(result)[:300]}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="benchmark names (default: all)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="output folder")
    args = parser.parse_args(argv)
    failed = []
    for name, bench_args in BENCHMARKS.items():
        if args.only is not None and name not in args.only:
            continue
        try:
            run_one(name, bench_args, args.results)
        except Exception as err:  # report, run the others, fail at the end
            print(f"[bench] {name}: FAILED: {err}", file=sys.stderr, flush=True)
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
