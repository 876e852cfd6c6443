"""The command line of attention heatmaps: what a trained run attends to in one text.

    python -m transformer.show_attention runs/transformer-tiny-en-fr --text "And God saw the light."
    python -m transformer.show_attention runs/bert-tiny-mlm --text "The picture is sharp, but the sound is poor." --layer 0 --head 1

Writes one PNG per attention (encoder self-attention, decoder self- and cross-attention) of one
layer, averaged over heads unless `--head` picks one; an encoder-decoder run shows the text
against its greedy translation.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from transformer.interpret import plot_attention, text_attention
from transformer.runs import load_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transformer.show_attention", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run directory written by `python -m train`")
    parser.add_argument("--text", required=True, help="the text (the source, for a translation run)")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: RUN_DIR/attention)")
    parser.add_argument("--layer", type=int, default=-1, help="layer index (default: the last)")
    parser.add_argument("--head", type=int, default=None, help="head index (default: the mean over heads)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    args = parser.parse_args(argv)
    try:
        run = load_run(args.run_dir, step=args.step)
        out = pathlib.Path(args.out or pathlib.Path(args.run_dir) / "attention")
        attentions = text_attention(run, args.text)
        for name, attention in attentions.items():  # every choice checked before anything is written
            layers, heads = attention.weights.shape[:2]
            if not -layers <= args.layer < layers or (args.head is not None and not -heads <= args.head < heads):
                raise ValueError(f"{name} has {layers} layers of {heads} heads; got --layer {args.layer} --head {args.head}.")
        out.mkdir(parents=True, exist_ok=True)
        for name, attention in attentions.items():
            layers, heads = attention.weights.shape[:2]
            layer = attention.weights[args.layer]  # [N, T, S]
            weights = layer.mean(0) if args.head is None else layer[args.head]
            which = "mean" if args.head is None else f"head{args.head % heads}"  # one file per choice
            path = out / f"{name.replace('/', '_')}_layer{args.layer % layers}_{which}.png"
            head = "mean of heads" if args.head is None else f"head {args.head % heads}"
            title = f"{name}, layer {args.layer % layers}, {head}"
            plot_attention(weights, path, query_labels=attention.queries, key_labels=attention.keys, title=title)
            print(path)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
