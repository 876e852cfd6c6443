"""Throughput of the data pipelines on the real data sets: tokens per second, one process.

    python benchmarks/data_pipeline.py [--batch-size 32] [--length 128] [--batches 200]
        [--out benchmarks/results/data_pipeline.json]

Each pipeline is timed from a fresh iterator over its training split (tokenizer trained on
the spot); setup (tokenizing and packing the corpus) is reported separately. Tokens are all
positions of the produced batches' inputs, padding included: source and target for translation
(as the training log counts them).
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import grain

from train import data, datasets
from transformer.tokenizer import Tokenizer
from report import write_results


INPUTS = ("tokens", "source", "target_in")  # the token inputs of every task's batches


def train_tokenizer(texts: list[str], directory: str) -> Tokenizer:
    corpus = pathlib.Path(directory) / "corpus.txt"
    corpus.write_text("\n".join(texts))
    return Tokenizer.train([corpus], vocab_size=8000, model_prefix=pathlib.Path(directory) / "spm")


def pipelines(tokenizer: Tokenizer, length: int):
    """name -> (setup function returning (dataset, random_map))."""

    def causal_lm():
        packed = data.PackedLM(datasets.load_dataset("shakespeare", "train"), tokenizer, length)
        return grain.MapDataset.source(packed), None

    def masked_lm():
        examples = data.MaskedLMExamples(
            datasets.load_dataset("shakespeare", "train"), tokenizer, length, next_sentence=True
        )
        return grain.MapDataset.range(len(examples)), lambda i, rng: examples.example(i, rng)

    def seq2seq():
        pairs = datasets.load_dataset("bible-en-fr", "train")
        return grain.MapDataset.source(pairs).map(lambda e: data.seq2seq_features(e, tokenizer, length, length)), None

    def classification():
        examples = datasets.load_dataset("rt-polarity", "train")
        return grain.MapDataset.source(examples).map(lambda e: data.classification_features(e, tokenizer, length)), None

    return {"causal-lm": causal_lm, "masked-lm+nsp": masked_lm, "seq2seq": seq2seq, "classification": classification}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/data_pipeline.json")
    args = parser.parse_args()

    texts = [e["text"] for e in datasets.load_dataset("shakespeare", "train")]
    texts += [e[k] for e in datasets.load_dataset("bible-en-fr", "train") for k in ("source", "target")]
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        tokenizer = train_tokenizer(texts, directory)
        tokenizer_seconds = time.perf_counter() - start
        print(f"tokenizer: 8000 pieces trained on {sum(map(len, texts)) / 1e6:.1f} MB in {tokenizer_seconds:.1f} s")
        print(f"{'pipeline':>16} {'setup s':>8} {'tokens/s':>12} {'batches/s':>10}")
        rows = []
        for name, setup in pipelines(tokenizer, args.length).items():
            start = time.perf_counter()
            dataset, random_map = setup()
            setup_seconds = time.perf_counter() - start
            iterator = data.batches(dataset, global_batch_size=args.batch_size, random_map=random_map)
            start, tokens = time.perf_counter(), 0
            for _ in range(args.batches):
                batch = next(iterator)
                tokens += sum(batch[key].size for key in INPUTS if key in batch)
            seconds = time.perf_counter() - start
            row = {"pipeline": name, "setup_seconds": setup_seconds, "tokens_per_second": tokens / seconds,
                   "batches_per_second": args.batches / seconds}
            rows.append(row)
            print(f"{name:>16} {setup_seconds:>8.2f} {row['tokens_per_second']:>12,.0f} "
                  f"{row['batches_per_second']:>10.1f}")
    write_results(args.out, rows, batch_size=args.batch_size, length=args.length, batches=args.batches,
                  tokenizer_seconds=tokenizer_seconds)


if __name__ == "__main__":
    main()
