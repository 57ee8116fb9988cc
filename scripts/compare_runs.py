"""Print one side-by-side markdown table of the evaluation results of several runs.

    python scripts/compare_runs.py WORKDIR1 WORKDIR2 ... [--output=table.md]

Reads each `<workdir>/eval/results.json` (one entry per protocol of config.eval.protocols, as
written by `bow_jax.protocols.runner`) and, when present, `<workdir>/eval/finetune.json`
(semi-supervised fine-tuning; a run may have either or both). One row per network of every run
(e.g. the trained net and its random-init baseline), each protocol's own columns (`runner.flat`
asks it), accuracies in %. A results.json path may be given instead of a workdir.
"""
import argparse
import json
import os
import sys

from bow_jax.protocols import runner
from bow_jax.lib import files


def _load(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"compare_runs: {path} does not exist ({what}); run the `evaluate` task "
                         "(or training with config.eval.after_training) on that workdir first.")
    except json.JSONDecodeError as e:
        raise SystemExit(f"compare_runs: {path} is not valid JSON ({e}).")


def run_rows(path: str) -> dict:
    """{row label: {column: accuracy %}} of one run (a workdir or its results.json)."""
    if path.endswith(".json"):
        results_path, workdir = path, os.path.dirname(os.path.dirname(os.path.abspath(path)))
        label = path
    else:
        results_path, workdir = os.path.join(path, "eval", "results.json"), path
        label = path.rstrip("/")
    finetune_path = os.path.join(workdir, "eval", "finetune.json")
    rows = {}
    if os.path.exists(results_path) or not os.path.exists(finetune_path):
        rows = {f"{label}: {network}": runner.flat(result)
                for network, result in _load(results_path, "evaluation protocols").items()}
    if os.path.exists(finetune_path):
        for network, runs in _load(finetune_path, "fine-tuning").items():
            row = rows.setdefault(f"{label}: {network}", {})
            for name, result in runs.items():
                row[f"fine-tune {name} top-1"] = 100 * result["top1"]
                if "top5" in result:  # recorded since 2026-11-30
                    row[f"fine-tune {name} top-5"] = 100 * result["top5"]
    return rows


def comparison_table(paths) -> str:
    """The markdown table of all runs: rows in the given order, columns in first-seen order."""
    rows = {}
    for path in paths:
        rows.update(run_rows(path))
    return runner.rows_table(rows, "run: network", align="---:", missing="–")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="workdirs (or their eval/results.json files)")
    parser.add_argument("--output", default="", help="also write the table to this file")
    args = parser.parse_args(argv)
    table = comparison_table(args.runs)
    print(table)
    if args.output:
        files.atomic_write_text(args.output, table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
