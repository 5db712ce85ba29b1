"""Run many Text2LIVE edits from one jobs file, on this machine or on a Ray cluster.

    python batch.py jobs.yaml
    python batch.py jobs.yaml --out results/batch
    python batch.py jobs.yaml --ray auto        (pip install -r requirements-ray.txt)
    python batch.py jobs.yaml n_epochs=300      (key=value: a config change for every job)
"""

import argparse
import sys
from collections import Counter

from jobs.batch import run_batch
from util.cli import run_cli
from util.config import parse_overrides


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("jobs", help="a YAML file with a top-level 'jobs:' list")
    parser.add_argument("--out", default=None, metavar="DIR", help="where runs/, summary.csv and gallery.html go "
                        "(default: the jobs file's folder)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config changes for every job, on top "
                        "of each job's own overrides")
    parser.add_argument("--ray", default=None, metavar="ADDRESS", help="run every job as a Ray task with one GPU: "
                        "auto (the running cluster), host:port, or local (a one-machine Ray started here)")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    rows, completed, out_dir = run_batch(args.jobs, args.out, args.ray, common=parse_overrides(args.overrides))
    counts = Counter(row["status"] for row in rows)
    print(f"{', '.join(f'{n} {status}' for status, n in counts.items())}; wrote {out_dir / 'summary.csv'} and "
          f"{out_dir / 'gallery.html'}")
    for row in rows:
        if row["status"] == "failed":
            print(f"failed: {row['job']}: {row['error']}", file=sys.stderr)
    if not completed:
        print(f"interrupted; continue with: python batch.py {' '.join(sys.argv[1:] if argv is None else argv)}",
              file=sys.stderr)
        sys.exit(130)
    if counts.get("failed"):
        sys.exit(1)
    return rows


if __name__ == "__main__":
    run_cli(main)
