"""Decoding speed: prefill and decode measured apart, each decode step against the memory bound.

    python benchmarks/decode.py [--models gpt2-small t5-small] [--batch-sizes 1 8 32]
        [--prompt-length 32] [--new-tokens 64] [--repeats 3] [--dtype float32 [bfloat16]]
        [--set FIELD=VALUE ...] [--bandwidth GB/s] [--no-hf] [--out benchmarks/results/decode.json]

Every model has random weights, dropout 0, and decodes greedily with its KV cache a fixed
random prompt (encoder-decoder: a source of --prompt-length tokens, the decoder starting from
token 0) for exactly --new-tokens tokens (no EOS). --set changes ModelConfig fields of every
model (e.g. num_decoder_layers=4 d_model=256 num_heads=4 d_ff=1024 vocab_size=8192 for the
small GPT shape); --dtype float32 bfloat16 measures both compute dtypes in one run.

How prefill and decode are told apart. `transformer.generate` is one compiled program: the
prefill (prompt, or encoder plus first decoder token, in one pass) chooses the first token,
then a while loop runs one decode step per further token. So
    prefill      = a call with max_new_tokens=1 (no decode step at all),
    decode step  = (a call with --new-tokens - a call with 1) / (--new-tokens - 1);
the two calls differ in nothing else but the cache's slots (bucket + 1 against bucket +
--new-tokens; the prefill attends over them, a small part of its time). The model and
variables are prepared once with `transformer.decoding.for_decoding`, as a long-lived caller
(Sampler) would, so neither figure contains that one-off copy. Each figure is the median of
--repeats rounds after a warm-up call of each program (which compiles it); a round times both
calls, in alternating order.

The bound. A decode step must read every weight it uses once, in the compute dtype (the
decoder's projections and the output head, train.metrics.matmul_weights; not the encoder,
nor the embedding tables it reads one row of), plus the keys and values cached so far:
self-attention at the mean length over the decode steps (prompt + tokens so far;
encoder-decoder: tokens so far) and, for an encoder-decoder, the source's cross-attention
keys and values. Those bytes over the rate at which memory is read, measured on the spot
(workload.measured_read_bandwidth: a 512 MB matrix, 4 GB on a GPU, read by a matrix-vector
product; or --bandwidth) are "bound ms/step", and "% of bound" is bound /
measured step (100%: as fast as memory allows). The implementation reads the whole
preallocated cache (bucket + --new-tokens slots) at every step; the bound counts only the
tokens there are. "FLOP ms/step" is the step's arithmetic (2 FLOPs per weight and row, 2 per
cached key or value element and query head) at the matmul rate measured on the spot
(workload.measured_matmul_peak, a large square product in the compute dtype): where it
exceeds the bound (large batches on a CPU), the step is compute-bound.

When torch and transformers are importable (pip install torch transformers, a CPU build of
torch; --no-hf skips it), Hugging Face's PyTorch `generate` is timed the same way (its
prefill with max_new_tokens=1, its step from the difference; min_new_tokens forces the
length) on the same shapes, on the CPU, or on CUDA when JAX runs on a GPU (otherwise left
out there), in a process of its own after ours, with torch's own thread settings: in one
process the two runtimes' threads fight over the cores (benchmarks/compare.py, which puts
more peers side by side, says how).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import statistics
import sys
import time
from typing import Callable

import flax.linen as nn
import jax
import numpy as np

import transformer as tfm
from report import in_own_process, write_results
from train.metrics import matmul_weights
from transformer.decoding import for_decoding
from workload import device_line, measured_matmul_peak, measured_read_bandwidth, model_config

Run = Callable[[int], None]  # one generate call with this many new tokens, blocking until done


# ----------------------------------------------------------------------------- the bound


def kv_cache_bytes(config: tfm.ModelConfig, batch: int, length: float, itemsize: int) -> float:
    """Bytes of the keys and values of `length` tokens in every decoder layer."""
    return 2 * config.num_decoder_layers * batch * length * config.num_kv_heads * config.head_dim * itemsize


def step_cost(config: tfm.ModelConfig, batch: int, prompt_length: int, new_tokens: int) -> dict:
    """What one decode step reads and computes, on average over the steps of a call.

    Weights: the decoder's matrix-product weights and the output head, each read once
    (train.metrics.matmul_weights, the FLOP count of training; cross-attention keys and values
    are the encoder's, cached). FLOPs: 2 per weight and row, and 2 per cached key or value
    element and query head reading it.
    """
    itemsize = np.dtype(config.dtype).itemsize
    weights = matmul_weights(config)[1]
    mean_new = new_tokens / 2  # decode step i (1 .. new_tokens - 1) attends to i new tokens
    if config.num_encoder_layers:  # the decoder's own tokens after BOS, and the source's keys and values
        self_length, cross_length = 1 + mean_new, prompt_length
    else:
        self_length, cross_length = prompt_length + mean_new, 0
    cache = kv_cache_bytes(config, batch, self_length + cross_length, itemsize)
    flops = 2 * batch * weights + 2 * cache / itemsize * (config.num_heads // config.num_kv_heads)
    return {"weight_bytes": weights * itemsize, "kv_bytes": cache, "bytes_per_step": weights * itemsize + cache,
            "flops_per_step": flops}


# ----------------------------------------------------------------------------- the sides


def ours(config: tfm.ModelConfig, prompts: np.ndarray) -> Run:
    """Our generate on `config` (random weights), prepared once as a long-lived caller would."""
    encoder_decoder = bool(config.num_encoder_layers)
    model = tfm.Seq2SeqLM(config) if encoder_decoder else tfm.CausalLM(config)
    inputs = (prompts[:1], prompts[:1]) if encoder_decoder else (prompts[:1],)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), *inputs)["params"])
    model, variables = for_decoding(model, {"params": params})
    start = {"bos_id": 0} if encoder_decoder else {}

    def run(new_tokens: int):
        output = tfm.generate(model, variables, prompts, max_new_tokens=new_tokens, strategy="greedy", **start)
        jax.block_until_ready(output.tokens)

    return run


def hugging_face(config: tfm.ModelConfig, prompts: np.ndarray, device: str) -> Run:
    """transformers' PyTorch model of the same shape and its generate, on `device`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from transformer.architectures import ARCHITECTURES

    encoder_decoder = bool(config.num_encoder_layers)
    family = "t5" if encoder_decoder else "gpt2"
    hf_config = AutoConfig.for_model(**ARCHITECTURES[family].hf_config(config))
    torch.manual_seed(0)
    auto = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(hf_config).eval().to(device=device, dtype=getattr(torch, config.dtype))
    input_ids = torch.as_tensor(prompts, dtype=torch.long, device=device)
    start = {"decoder_start_token_id": 0} if encoder_decoder else {}

    def run(new_tokens: int):
        with torch.inference_mode():
            model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0, **start,
            )
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def hf_device() -> tuple[str | None, str | None]:
    """(where Hugging Face runs beside JAX's backend, "cuda" or "cpu"; None) or (None, why it is left out)."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        return None, "not installed: pip install torch transformers"
    if jax.default_backend() == "cpu":
        return "cpu", None
    if jax.default_backend() != "gpu":
        return None, f"no torch device for JAX's {jax.default_backend()}"
    import torch

    if not torch.cuda.is_available():
        return None, "torch has no CUDA here, and a CPU figure beside a GPU one compares nothing"
    return "cuda", None


def run_hf_case(case: dict) -> None:
    """The child process: prints [prefill seconds, step seconds or null] as JSON."""
    config = model_config(case["model"], case["set"], dtype=case["dtype"], dropout_rate=0.0, attention_dropout_rate=0.0)
    run = hugging_face(config, np.asarray(case["prompts"], np.int32), case["device"])
    print(json.dumps(prefill_and_step(run, case["new_tokens"], case["repeats"])))


def prefill_and_step(run: Run, new_tokens: int, repeats: int) -> tuple[float, float | None]:
    """Median seconds of a prefill (1 new token) and of one decode step (see the module doc);
    None for the step when noise made the whole call no slower than the prefill alone."""
    run(1), run(new_tokens)  # warm-up: compiles both programs
    prefills, fulls = [], []
    for round_ in range(repeats):
        for tokens in (1, new_tokens) if round_ % 2 == 0 else (new_tokens, 1):
            start = time.perf_counter()
            run(tokens)
            (prefills if tokens == 1 else fulls).append(time.perf_counter() - start)
    prefill, full = statistics.median(prefills), statistics.median(fulls)
    if full <= prefill:
        print(f"warning: {new_tokens} tokens took no longer than 1 ({full * 1e3:.2f} against {prefill * 1e3:.2f} ms): "
              "no decode step time; raise --repeats or --new-tokens.", file=sys.stderr)
        return prefill, None
    return prefill, (full - prefill) / (new_tokens - 1)


# ----------------------------------------------------------------------------- the table


COLUMNS = [  # (header, row key, format of a value); numbers right-aligned under their header
    ("model", "model", "{:<12}"), ("dtype", "dtype", "{:<8}"), ("batch", "batch", "{:d}"),
    ("prefill ms", "prefill_ms", "{:.1f}"), ("prefill tok/s", "prefill_tokens_per_second", "{:.0f}"),
    ("decode ms/step", "decode_ms_per_step", "{:.2f}"), ("decode tok/s", "decode_tokens_per_second", "{:.1f}"),
    ("bound ms/step", "bound_ms_per_step", "{:.2f}"), ("% of bound", "percent_of_bound", "{:.0f}"),
    ("FLOP ms/step", "flop_ms_per_step", "{:.2f}"),
]
HF_COLUMNS = [
    ("HF prefill ms", "hf_prefill_ms", "{:.1f}"), ("HF ms/step", "hf_decode_ms_per_step", "{:.2f}"),
    ("HF step / ours", "hf_over_ours_step", "{:.2f}"),
]
TEXT = ("model", "dtype")


def header(columns) -> str:
    return " ".join(form.format(name) if key in TEXT else name for name, key, form in columns)


def line(row: dict, columns) -> str:
    cells = []
    for name, key, form in columns:
        value = row.get(key)
        if key in TEXT:
            cells.append(form.format(value))
        else:
            cells.append(("-" if value is None else form.format(value)).rjust(len(name)))
    return " ".join(cells)


def load_line() -> str:
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    return f"load average {load:.2f} on {cores} cores" + (" (busy: figures are noisy)" if load > cores else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2-small", "t5-small"], help="ModelConfig presets")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="ModelConfig fields of every model")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64, help="at least 2: one prefill token, then steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                        help="compute dtypes (parameters stay float32)")
    parser.add_argument("--bandwidth", type=float, default=None, metavar="GB/s",
                        help="memory read bandwidth for the bound instead of measuring it")
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face's PyTorch generate")
    parser.add_argument("--out", default="benchmarks/results/decode.json")
    parser.add_argument("--hf-case", type=json.loads, help=argparse.SUPPRESS)  # a child process timing HF
    args = parser.parse_args()
    if args.hf_case:
        return run_hf_case(args.hf_case)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the first comes from the prefill)")
    bandwidth = args.bandwidth * 1e9 if args.bandwidth else measured_read_bandwidth()
    peaks = {dtype: measured_matmul_peak(dtype) for dtype in args.dtype}
    print(f"device: {device_line()}; {load_line()}")
    source = "given" if args.bandwidth else "measured"
    print(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s ({source}); matmul peak "
          + ", ".join(f"{dtype} {peak / 1e9:.0f} GFLOP/s" for dtype, peak in peaks.items())
          + f"; prompt {args.prompt_length}, {args.new_tokens} new tokens, greedy, median of {args.repeats}")
    device, hf_missing = (None, None) if args.no_hf else hf_device()
    columns = COLUMNS + (HF_COLUMNS if device else [])
    print(header(columns))
    rows = []
    for name in args.models:
        for dtype in args.dtype:
            config = model_config(name, args.set, dtype=dtype, dropout_rate=0.0, attention_dropout_rate=0.0)
            for batch in args.batch_sizes:
                prompts = np.random.default_rng(batch).integers(7, config.vocab_size, (batch, args.prompt_length))
                prompts = prompts.astype(np.int32)
                run = ours(config, prompts)
                prefill, step = prefill_and_step(run, args.new_tokens, args.repeats)
                reads = step_cost(config, batch, args.prompt_length, args.new_tokens)
                bound = reads["bytes_per_step"] / bandwidth
                row = {
                    "model": name, "dtype": dtype, "batch": batch,
                    "prefill_ms": prefill * 1e3, "prefill_tokens_per_second": batch * args.prompt_length / prefill,
                    "decode_ms_per_step": step and step * 1e3, "decode_tokens_per_second": step and batch / step,
                    "bound_ms_per_step": bound * 1e3, "percent_of_bound": 100 * bound / step if step else None,
                    "flop_ms_per_step": reads["flops_per_step"] / peaks[dtype] * 1e3,
                    **reads,
                }
                if device:
                    # Hugging Face in a process of its own, so that its threads never share one with XLA's
                    hf_prefill, hf_step = in_own_process(__file__, "--hf-case", json.dumps({
                        "model": name, "set": args.set, "dtype": dtype, "prompts": prompts.tolist(), "device": device,
                        "new_tokens": args.new_tokens, "repeats": args.repeats,
                    }))
                    row.update(hf_prefill_ms=hf_prefill * 1e3, hf_decode_ms_per_step=hf_step and hf_step * 1e3,
                               hf_over_ours_step=hf_step / step if step and hf_step else None)
                rows.append(row)
                print(line(row, columns))
    if hf_missing:
        print(f"Hugging Face left out: {hf_missing}")
    print(load_line())
    versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers")} if device else {}
    write_results(
        args.out, rows, read_bandwidth_bytes_per_second=bandwidth, read_bandwidth_given=bool(args.bandwidth),
        matmul_peak_flops={dtype: peak for dtype, peak in peaks.items()},
        prompt_length=args.prompt_length, new_tokens=args.new_tokens, repeats=args.repeats, set=args.set, **versions,
    )


if __name__ == "__main__":
    main()
