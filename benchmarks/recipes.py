"""Every recipe end to end, one after another: each named experiment with its defaults, its
training and wall time, and its last validation figures (the figures behind the README's
Results table; translation BLEU here is the run's own, on its `bleu_examples` verses).

    python benchmarks/recipes.py [--runs runs/recipes] [--only NAME ...] [--set key=value ...]
        [--out benchmarks/results/recipes.json]

Each run is its own `python -m train` process: "train s" is the loop's own time (its `Done: N
steps in T s`: the first, compiling step to the last evaluation and save), "wall s" adds the
process's start, data and tokenizer preparation and building the model (compiled cold, as in a
first run: `compilation_cache=` is off unless `--set` says otherwise). A
sentiment fine-tune starts from the pretraining run made before it (skipped if that run failed;
`--only bert-tiny-sentiment` needs it in `--runs` already); `sentiment-from-scratch` is the same
fine-tune with a fresh body and a tokenizer trained on the reviews. A run directory that holds a
finished run is not trained again: its figures are read and it is marked reused. `--set` adds
overrides to every run; give a dry run (`--set steps=20`) its own `--runs` folder, since a run
directory resumes towards whatever `steps` the next command asks for.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shlex
import subprocess
import sys
import time

from report import write_results
from train import rundir

# (name, experiment, overrides); {runs} is the folder of run directories
RECIPES = [
    ("gpt-quick", "gpt-quick", []),
    ("gpt-quick-sentiment", "gpt-quick-sentiment", ["init_from={runs}/gpt-quick"]),
    ("gpt-tiny", "gpt-tiny", []),
    ("bert-tiny-mlm", "bert-tiny-mlm", []),
    ("roberta-tiny-mlm", "roberta-tiny-mlm", []),
    ("albert-tiny-sop", "albert-tiny-sop", []),
    ("spanbert-tiny", "spanbert-tiny", []),
    ("t5-tiny-denoise", "t5-tiny-denoise", []),
    ("t5-tiny-sentiment", "t5-tiny-sentiment", ["init_from={runs}/t5-tiny-denoise"]),
    ("bert-tiny-ner", "bert-tiny-ner", []),
    ("bert-tiny-sentiment", "bert-tiny-sentiment", ["init_from={runs}/bert-tiny-mlm"]),
    ("sentiment-from-scratch", "bert-tiny-sentiment", ["init_from="]),
    ("transformer-tiny-en-fr", "transformer-tiny-en-fr", []),
]
FIGURES = ("loss", "perplexity", "nats_per_char", "nsp_accuracy", "sbo_loss", "accuracy", "bleu", "bleu_beam", "exact_match",
           "entity_f1")
DONE = re.compile(r"^Done: (\d+) steps in (\d+) s")


def last_validation(run_dir: pathlib.Path) -> dict:
    """The run's last validation record (its figures only), or {} if it wrote none."""
    records, _ = rundir.read_metrics(run_dir / "metrics.jsonl")
    records = [r for r in records if r["split"] == "validation"]
    return {k: records[-1][k] for k in ("step", *FIGURES) if records and k in records[-1]}


def run_recipe(name: str, args: list[str], runs: pathlib.Path) -> dict:
    """Runs `python -m train ARGS`, its output passed through; the row of the table."""
    command = shlex.join(["python", "-m", "train", *args])
    print(f"$ {command}", flush=True)
    start, train_s = time.perf_counter(), None
    with subprocess.Popen([sys.executable, "-m", "train", *args], cwd=pathlib.Path(__file__).parents[1],
                          stdout=subprocess.PIPE, text=True, bufsize=1) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
            if done := DONE.match(line):
                train_s = int(done.group(2))
    wall = time.perf_counter() - start
    # a finished run directory trains no step, so it prints no `Done:` line
    status = f"exit status {process.returncode}" if process.returncode else "reused" if train_s is None else "trained"
    return {"recipe": name, "command": command, "status": status, "train_s": train_s, "wall_s": round(wall, 1),
            **last_validation(runs / name)}


def print_table(rows: list[dict]) -> None:
    columns = [c for c in ("step", *FIGURES) if any(c in row for row in rows)]
    print(f"\n{'recipe':24s} {'train s':>8s} {'wall s':>8s} " + " ".join(f"{c:>13s}" for c in columns))
    for row in rows:
        figures = " ".join(f"{row[c]:13.4g}" if c in row else f"{'':13s}" for c in columns)
        train_s = "" if row.get("train_s") is None else str(row["train_s"])
        wall_s = "" if row.get("wall_s") is None else f"{row['wall_s']:.1f}"
        status = "" if row["status"] == "trained" else row["status"]
        print(f"{row['recipe']:24s} {train_s:>8s} {wall_s:>8s} {figures}  {status}".rstrip())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/recipes", help="folder for the run directories")
    parser.add_argument("--only", nargs="+", choices=[name for name, _, _ in RECIPES], help="these recipes alone")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides added to every run")
    parser.add_argument("--out", default="benchmarks/results/recipes.json")
    args = parser.parse_args()
    runs = pathlib.Path(args.runs).resolve()
    rows, failed = [], set()
    for name, experiment, overrides in RECIPES:
        if args.only and name not in args.only:
            continue
        needs = [other for other in failed if "{runs}/" + other in " ".join(overrides)]
        if needs:
            rows.append({"recipe": name, "status": f"skipped: {needs[0]} failed"})
            failed.add(name)
            continue
        row = run_recipe(name, [experiment, f"run_dir={runs / name}", *(o.format(runs=runs) for o in overrides),
                                "compilation_cache=", *args.set], runs)
        if row["status"].startswith("exit status"):
            failed.add(name)
        rows.append(row)
    print_table(rows)
    write_results(args.out, rows, runs=str(runs), overrides=args.set)


if __name__ == "__main__":
    main()
