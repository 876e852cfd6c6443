"""Every recipe end to end, one after another: each named experiment with its defaults, its
wall time and its last validation figures (the README's Results table, on this machine).

    python benchmarks/recipes.py [--runs runs/recipes] [--only NAME ...] [--set key=value ...]
        [--out benchmarks/results/recipes.json]

Each run is its own `python -m train` process, so its wall time counts tokenizer training,
compiling, evaluations and checkpoints. The sentiment fine-tune starts from the pretraining run
made just before it; `sentiment-from-scratch` is the same fine-tune with a fresh body (and a
tokenizer trained on the reviews). `--set` adds overrides to every run (e.g. `steps=20` for a
dry run). A run directory that holds a finished run is not trained again; its figures are read.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

from report import write_results

# (name, experiment, overrides); {runs} is the folder of run directories
RECIPES = [
    ("gpt-tiny", "gpt-tiny", []),
    ("bert-tiny-mlm", "bert-tiny-mlm", []),
    ("bert-tiny-sentiment", "bert-tiny-sentiment", ["init_from={runs}/bert-tiny-mlm"]),
    ("sentiment-from-scratch", "bert-tiny-sentiment", ["init_from="]),
    ("transformer-tiny-en-fr", "transformer-tiny-en-fr", []),
]
FIGURES = ("loss", "perplexity", "nats_per_char", "nsp_accuracy", "accuracy", "bleu", "bleu_beam")


def last_validation(run_dir: pathlib.Path) -> dict:
    """The run's last validation record (its figures only), or {} if it wrote none."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    records = [r for r in records if r.get("split") == "validation"]
    return {k: records[-1][k] for k in ("step", *FIGURES) if records and k in records[-1]}


def run_recipe(name: str, experiment: str, overrides: list[str], runs: pathlib.Path) -> dict:
    run_dir = runs / name
    args = [experiment, f"run_dir={run_dir}", *(o.format(runs=runs) for o in overrides)]
    print(f"$ python -m train {' '.join(args)}", flush=True)
    start = time.perf_counter()
    process = subprocess.run([sys.executable, "-m", "train", *args], cwd=pathlib.Path(__file__).parents[1])
    wall = time.perf_counter() - start
    return {"recipe": name, "command": f"python -m train {' '.join(args)}", "returncode": process.returncode,
            "wall_s": round(wall, 1), **last_validation(run_dir)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/recipes", help="folder for the run directories")
    parser.add_argument("--only", nargs="+", choices=[name for name, _, _ in RECIPES], help="these recipes alone")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides added to every run")
    parser.add_argument("--out", default="benchmarks/results/recipes.json")
    args = parser.parse_args()
    runs = pathlib.Path(args.runs).resolve()
    rows = [
        run_recipe(name, experiment, overrides + args.set, runs)
        for name, experiment, overrides in RECIPES if not args.only or name in args.only
    ]
    columns = [c for c in ("step", *FIGURES) if any(c in row for row in rows)]
    print(f"\n{'recipe':24s} {'wall s':>8s} " + " ".join(f"{c:>13s}" for c in columns))
    for row in rows:
        figures = " ".join(f"{row[c]:13.4g}" if c in row else f"{'':13s}" for c in columns)
        status = "" if row["returncode"] == 0 else f"  (exit status {row['returncode']})"
        print(f"{row['recipe']:24s} {row['wall_s']:8.1f} {figures}{status}")
    write_results(args.out, rows, runs=str(runs))


if __name__ == "__main__":
    main()
