"""`python -m train [EXPERIMENT | CONFIG.yaml] [key=value ...]`: the training job."""

from __future__ import annotations

import sys

if __name__ == "__main__":  # first: before JAX is imported, a restart costs little
    from train.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages()  # about 12% faster training steps on a CPU; see train.hugepages

from train.config import DEFAULT_EXPERIMENT, EXPERIMENTS, FIELDS, parse_args, to_dict  # noqa: E402


def usage() -> str:
    lines = [
        "usage: python -m train [EXPERIMENT | CONFIG.yaml] [key=value ...]",
        "",
        "Trains a Transformer and writes a run directory (config, tokenizer, checkpoints, metrics);",
        "running the same command again resumes from the latest checkpoint.",
        "",
        f"experiments (default {DEFAULT_EXPERIMENT}):",
    ]
    for name, config in EXPERIMENTS.items():
        m = config.model
        layers = "+".join(str(n) for n in (m.num_encoder_layers, m.num_decoder_layers) if n)
        data = config.init_from and f"{config.dataset}, from {config.init_from}" or config.dataset
        lines.append(f"  {name:24s}{config.task} on {data}; {layers} layers, d_model {m.d_model}, {config.steps} steps")
    lines += ["", "keys (defaults of the default experiment):"]
    for key, value in to_dict(EXPERIMENTS[DEFAULT_EXPERIMENT]).items():
        if key == "model":
            lines.append(f"  {'model':24s}{'':>14}  a model preset name, or model.FIELD=VALUE for one architecture field")
            continue
        lines.append(f"  {key:24s}{value!r:>14}  {FIELDS[key].metadata.get('help', '')}".rstrip())
    lines += ["", "A CONFIG.yaml holds key: value lines over the default experiment, or over the one its",
              "`experiment:` key names.",
              "", "example: python -m train transformer-tiny-en-fr steps=200 model.num_decoder_layers=3"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in args):
        print(usage())
        return 0
    try:
        config = parse_args(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}\nRun `python -m train --help` for the experiments and keys.", file=sys.stderr)
        return 2
    from train.loop import TrainingDiverged, run  # after parsing: --help and config errors need no JAX
    from train.rundir import RunDirectoryBusy

    try:
        result = run(config)
    except (ValueError, FileNotFoundError, TrainingDiverged, RunDirectoryBusy) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a full disk, a folder that became read-only: one line, not a traceback
        print(f"error: {error} Once fixed, run the same command again to resume.", file=sys.stderr)
        return 1
    # the run has said where its directory is and shown its last sample
    return 128 + int(result.stopped_by_signal) if result.stopped_by_signal else 0


if __name__ == "__main__":
    sys.exit(main())
