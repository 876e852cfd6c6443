"""A distilled student against its teacher: parameters, encoder speed, how closely the student's
sentence embeddings follow the teacher's, and how each fine-tunes.

    python benchmarks/distillation.py [--teacher all-minilm-l6-v2] [--student runs/minilm-distil]
        [--fine-tunes runs/minilm-sentiment runs/minilm-distil-sentiment] [--batch 32] [--length 64]
        [--repeats 10] [--out benchmarks/results/distillation.json]

Rows: the teacher; the student as distillation starts it (the teacher's layers
`train.loop.student_layers` picks, no training: what distillation must improve on); the
distilled student. Columns:
  body parameters  embeddings, layers and pooler (no head);
  tokens/s         the encoder's forward pass over --batch x --length random tokens, jit-compiled,
                   the median of --repeats calls after a warm-up, the models side by side in one
                   process (the ratio is the figure to read);
  agreement        the mean cosine between the model's sentence embeddings (mean of the hidden
                   states, L2-normalised: sentence-transformers' MiniLM) and the teacher's, over
                   held-out sentences: the opinions corpus's validation documents (the text the
                   student was distilled on, other documents) and rt-polarity's validation
                   sentences (another domain);
  rt-polarity      the validation accuracy of a fine-tune of the model (the last evaluation in
                   the run directories of --fine-tunes, teacher's then student's; blank if absent).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import transformer as tfm
from report import write_results
from train import datasets, rundir
from train.config import experiment
from train.loop import student_layers
from transformer.architectures import ENCODER
from transformer.models import keep_layers
from transformer.pretrained import Pretrained

BODY = ("embed", "encoder", "pooler")


def encoder_body(opened: Pretrained, params=None) -> Pretrained:
    """The body of an opened model (any encoder head), as `Pretrained.embed` reads it."""
    params = nn.meta.unbox(opened.params if params is None else params)
    return dataclasses.replace(opened, model=tfm.EncoderModel(opened.config), head=ENCODER,
                               params={name: value for name, value in params.items() if name in BODY})


def tokens_per_second(body: Pretrained, batch: int, length: int, repeats: int) -> float:
    encode = jax.jit(lambda params, tokens: body.model.apply({"params": params}, tokens))
    tokens = jnp.asarray(np.random.default_rng(0).integers(1000, body.config.vocab_size, (batch, length)), jnp.int32)
    encode(body.params, tokens).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encode(body.params, tokens).block_until_ready()
        times.append(time.perf_counter() - start)
    return batch * length / statistics.median(times)


def held_out_sentences() -> dict[str, list[str]]:
    opinions = [line for e in datasets.load_dataset("opinions", "validation") for line in e["text"].split("\n")]
    return {"opinions": opinions, "rt-polarity": [e["text"] for e in datasets.load_dataset("rt-polarity", "validation")]}


def fine_tuned_accuracy(run_dir: pathlib.Path) -> float | None:
    if not (run_dir / "metrics.jsonl").is_file():
        return None
    records = [r for r in rundir.read_metrics(run_dir / "metrics.jsonl")[0] if r["split"] == "validation"]
    return records[-1]["accuracy"] if records else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="all-minilm-l6-v2")
    parser.add_argument("--student", default="runs/minilm-distil")
    parser.add_argument("--fine-tunes", nargs=2, default=["runs/minilm-sentiment", "runs/minilm-distil-sentiment"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/distillation.json")
    args = parser.parse_args()

    teacher = tfm.from_pretrained(args.teacher, ENCODER)
    student = encoder_body(tfm.from_pretrained(args.student))
    layers = student_layers(experiment("minilm-distil").replace(teacher=args.teacher,
                                                                student_layers=student.config.num_encoder_layers),
                            teacher.config.num_encoder_layers)
    start = dataclasses.replace(encoder_body(teacher, keep_layers(teacher.params, layers)),
                                model=tfm.EncoderModel(teacher.config.replace(num_encoder_layers=len(layers))))
    sentences = held_out_sentences()
    reference = {name: teacher.embed(texts) for name, texts in sentences.items()}
    fine_tunes = [pathlib.Path(p) for p in args.fine_tunes]
    models = [("teacher", teacher, fine_tunes[0]), (f"student at start (teacher layers {layers})", start, None),
              ("distilled student", student, fine_tunes[1])]
    rows = []
    for name, body, fine_tune in models:
        row = {"model": name, "layers": body.config.num_encoder_layers,
               "body_parameters": sum(np.size(x) for x in jax.tree.leaves(body.params)),
               "tokens_per_second": tokens_per_second(body, args.batch, args.length, args.repeats)}
        for corpus, texts in sentences.items():
            row[f"agreement_{corpus}"] = float(np.mean(np.sum(body.embed(texts) * reference[corpus], axis=-1)))
        row["rt_polarity_accuracy"] = fine_tuned_accuracy(fine_tune) if fine_tune else None
        rows.append(row)
    print(f"{'model':<42}{'layers':>7}{'params':>12}{'tokens/s':>10}{'speed':>7}{'agree opin.':>12}"
          f"{'agree rt':>10}{'rt-pol. acc':>12}")
    for row in rows:
        accuracy = "" if row["rt_polarity_accuracy"] is None else f"{row['rt_polarity_accuracy']:.1%}"
        print(f"{row['model']:<42}{row['layers']:>7}{row['body_parameters']:>12,}{row['tokens_per_second']:>10,.0f}"
              f"{row['tokens_per_second'] / rows[0]['tokens_per_second']:>6.2f}x{row['agreement_opinions']:>12.4f}"
              f"{row['agreement_rt-polarity']:>10.4f}{accuracy:>12}")
    write_results(args.out, rows, teacher=args.teacher, student=args.student, batch=args.batch, length=args.length,
                  sentences={name: len(texts) for name, texts in sentences.items()})


if __name__ == "__main__":
    main()
