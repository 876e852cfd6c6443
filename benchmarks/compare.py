"""Our training step and decoding loop against PyTorch and Hugging Face, each side in a process of its own.

    pip install torch==2.13.0 transformers==4.57.6      # the peers (a CPU build of torch)
    python benchmarks/compare.py [--only train|decode] [--calls 5] [--repeats 3] [--compile]
        [--train-layers 4 [12]] [--batch-sizes 1 8] [--prompt-length 32] [--new-tokens 64] [--full-size]
        [--torch-threads N] [--out benchmarks/results/compare.json]

Every model is float32 with dropout 0 and random weights, and has the same shape and parameter
count on every side (checked, printed). The GPT-2 shape is `gpt2-small` cut to 4 layers,
d_model 256, 4 heads, d_ff 1024, vocabulary 8192, 256 positions (learned positions,
pre-LayerNorm, GELU-tanh, tied embeddings); the T5 shape is `t5-small` cut the same way (4 + 4
layers).

Training (GPT-2 shape, --train-layers deep, batch 8 x 256 tokens, random tokens): tokens/s of one
full step and the first step's time (for ours and Flax the XLA compile, for torch.compile its
compile; ours scans its layers, so its compile hardly grows with depth, while HF Flax unrolls).
  ours      workload.training_step: the project's compiled step (AdamW lr 1e-4, betas 0.9/0.98,
            eps 1e-9, weight decay 0.01 on matrices, clipping 1.0, non-finite guard, metrics)
  torch     nanoGPT's GPT written below, eager: the same AdamW (decay on matrices), clipping 1.0,
            cross-entropy over all tokens
  torch.compile  (--compile) the same with the model under torch.compile
  hf-flax   transformers' FlaxGPT2LMHeadModel in one jitted step with the project's optimizer
            (train.optim.make_optimizer, the same as ours), parameters and state donated

Decoding: new tokens/s of greedy decoding with a KV cache, `--prompt-length` prompt tokens,
exactly `--new-tokens` new tokens (no EOS; the peers get min_new_tokens), prefill included,
at each of `--batch-sizes`, for the GPT-2 and T5 shapes (--full-size: gpt2-small, 124M, and
t5-small, 60M).
  ours      transformer.generate after transformer.for_decoding, as benchmarks/decode.py
  hf-torch  GPT2LMHeadModel / T5ForConditionalGeneration .generate under inference_mode
  hf-flax   FlaxGPT2LMHeadModel / FlaxT5ForConditionalGeneration .generate under one jax.jit
            (a peer that does not build or run with the installed jax is reported unavailable)

How it measures. Every side runs in a fresh process of its own, with the settings its users
would have: our training step with the huge pages `python -m train` turns on
(train/hugepages.py), our decoding as `generate` runs anywhere; PyTorch with its own thread
count and OpenMP wait policy (--torch-threads sets the count), HF Flax as JAX starts. In one
process the two runtimes' threads fight over the cores: with OpenMP's threads sleeping
(OMP_WAIT_POLICY=PASSIVE) torch's eager step ran about 20% slower than alone, with them
spinning ours did. A process builds its side, times its first call (wall time, and CPU time in
that process; torch.compile's compile workers are other processes, not counted), then --calls
calls (a training call is one step, a decoding call one `generate`) and keeps their median.
The sides take turns: --repeats rounds of one process per side, the order reversed every round
so that drift on the machine favours no side. A side's figure is the median over its rounds
(the table shows the range, the JSON every round). Ratios are ours / side: tokens/s (> 1: ours
is faster) and first call (> 1: ours takes longer). The load average is printed and recorded
before and after; figures from a busy machine are noisy.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import json
import os
import statistics
import time
from typing import Callable

import flax.linen as nn
import jax
import numpy as np
import optax

import transformer as tfm
import workload
from report import in_own_process, write_results
from train.hugepages import reexec_with_huge_pages
from train.optim import make_optimizer
from transformer.architectures import ARCHITECTURES

INSTALL = "pip install torch==2.13.0 transformers==4.57.6"
OURS = "ours"
TORCH_SIDES = ("torch", "torch.compile", "hf-torch")
TRAIN_BATCH, TRAIN_LENGTH = 8, 256
LEARNING_RATE = 1e-4  # workload.training_step's; the rest of AdamW is make_optimizer's defaults
ADAMW = dict(lr=LEARNING_RATE, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)
CLIP_NORM = 1.0
NO_DROPOUT = dict(dropout_rate=0.0, attention_dropout_rate=0.0, feed_forward_dropout_rate=0.0)
SMALL = dict(d_model=256, num_heads=4, d_ff=1024, vocab_size=8192, **NO_DROPOUT)

Run = Callable[[], None]
Side = Callable[[], tuple[int, Run]]  # builds a side: (parameter count, one timed call)


def gpt_config(full_size: bool = False) -> tfm.ModelConfig:
    if full_size:
        return tfm.ModelConfig.preset("gpt2-small", **NO_DROPOUT)
    return tfm.ModelConfig.preset("gpt2-small", num_decoder_layers=4, max_length=256, **SMALL)


def t5_config(full_size: bool = False) -> tfm.ModelConfig:
    if full_size:
        return tfm.ModelConfig.preset("t5-small", **NO_DROPOUT)
    return tfm.ModelConfig.preset("t5-small", num_encoder_layers=4, num_decoder_layers=4, **SMALL)


def hf_config(config: tfm.ModelConfig):
    """transformers' config of the same shape (the mapping the project's checkpoints use)."""
    from transformers import AutoConfig

    family = "t5" if config.num_encoder_layers else "gpt2"
    return AutoConfig.for_model(**ARCHITECTURES[family].hf_config(config))


def count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- training


def torch_gpt(config: tfm.ModelConfig):
    """nanoGPT's GPT at `config`'s shape: fused QKV, causal SDPA, GELU-tanh, pre-LayerNorm, tied head."""
    import torch
    from torch import nn as tnn
    from torch.nn import functional as F

    d, eps = config.d_model, config.norm_epsilon

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = tnn.LayerNorm(d, eps=eps), tnn.LayerNorm(d, eps=eps)
            self.c_attn, self.attn_proj = tnn.Linear(d, 3 * d), tnn.Linear(d, d)
            self.c_fc, self.mlp_proj = tnn.Linear(d, config.d_ff), tnn.Linear(config.d_ff, d)

        def forward(self, x):
            b, t, _ = x.shape
            qkv = self.c_attn(self.ln_1(x)).split(d, dim=2)
            q, k, v = (y.view(b, t, config.num_heads, -1).transpose(1, 2) for y in qkv)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + self.attn_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.wte = tnn.Embedding(config.vocab_size, d)
            self.wpe = tnn.Embedding(config.max_length, d)
            self.blocks = tnn.ModuleList(Block() for _ in range(config.num_decoder_layers))
            self.ln_f = tnn.LayerNorm(d, eps=eps)

        def forward(self, tokens):
            x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
            for block in self.blocks:
                x = block(x)
            return self.ln_f(x) @ self.wte.weight.T

    torch.manual_seed(0)
    return GPT()


def our_training(config: tfm.ModelConfig) -> tuple[int, Run]:
    step, state, batch = workload.training_step(config, TRAIN_BATCH, TRAIN_LENGTH)
    rng = jax.random.PRNGKey(0)

    def run():
        nonlocal state
        state, metrics = step(state, batch, rng)
        jax.block_until_ready(metrics)

    return count(state.params), run


def torch_training(config: tfm.ModelConfig, tokens: np.ndarray, targets: np.ndarray, compile: bool) -> tuple[int, Run]:
    import torch
    from torch.nn import functional as F

    model = torch_gpt(config)
    parameters = list(model.parameters())  # the tied embedding once
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in parameters if p.dim() >= 2]},
         {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}], **ADAMW)
    forward = torch.compile(model) if compile else model
    x, y = torch.as_tensor(tokens, dtype=torch.long), torch.as_tensor(targets, dtype=torch.long)

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(x).view(-1, config.vocab_size), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, CLIP_NORM)
        optimizer.step()

    return sum(p.numel() for p in parameters), run


def hf_flax_training(config: tfm.ModelConfig, tokens: np.ndarray, targets: np.ndarray) -> tuple[int, Run]:
    from transformers import FlaxGPT2LMHeadModel

    model = FlaxGPT2LMHeadModel(hf_config(config), seed=0)
    optimizer = make_optimizer(lambda _: LEARNING_RATE)

    def loss_fn(params, tokens, targets):
        logits = model(tokens, params=params, train=False).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, tokens, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = model.params
    opt_state = optimizer.init(params)
    tokens, targets = jax.device_put(tokens), jax.device_put(targets)

    def run():
        nonlocal params, opt_state
        params, opt_state, loss = step(params, opt_state, tokens, targets)
        jax.block_until_ready(loss)

    return count(params), run


def training_sides(compile: bool, layers: int) -> tuple[tfm.ModelConfig, dict[str, Side]]:
    config = gpt_config().replace(num_decoder_layers=layers)
    data = workload.synthetic_batch(workload.task_of(config), TRAIN_BATCH, TRAIN_LENGTH, config.vocab_size)
    tokens, targets = data["tokens"], data["targets"]
    sides = {OURS: lambda: our_training(config), "torch": lambda: torch_training(config, tokens, targets, False)}
    if compile:
        sides["torch.compile"] = lambda: torch_training(config, tokens, targets, True)
    sides["hf-flax"] = lambda: hf_flax_training(config, tokens, targets)
    return config, sides


# ----------------------------------------------------------------------------- decoding


def our_decoding(config: tfm.ModelConfig, prompts: np.ndarray, new_tokens: int) -> tuple[int, Run]:
    task = workload.task_of(config)
    model = task.model(config)
    variables = {"params": nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), *task.example_inputs())["params"])}
    parameters = count(variables["params"])  # the model's own (for_decoding adds a transposed head copy)
    model, variables = tfm.for_decoding(model, variables)  # as Sampler does: once per model
    bos = {"bos_id": 0} if task.encoder_decoder else {}

    def run():
        output = tfm.generate(model, variables, prompts, max_new_tokens=new_tokens, strategy="greedy", **bos)
        jax.block_until_ready(output.tokens)

    return parameters, run


def hf_torch_decoding(config: tfm.ModelConfig, prompts: np.ndarray, new_tokens: int) -> tuple[int, Run]:
    import torch
    from transformers import GPT2LMHeadModel, T5ForConditionalGeneration

    encoder_decoder = bool(config.num_encoder_layers)
    torch.manual_seed(0)
    model = (T5ForConditionalGeneration if encoder_decoder else GPT2LMHeadModel)(hf_config(config)).eval()
    input_ids = torch.as_tensor(prompts, dtype=torch.long)
    start = {"decoder_start_token_id": 0} if encoder_decoder else {}

    def run():
        with torch.inference_mode():
            model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0, **start,
            )

    return sum(p.numel() for p in model.parameters()), run


def hf_flax_decoding(config: tfm.ModelConfig, prompts: np.ndarray, new_tokens: int) -> tuple[int, Run]:
    from transformers import FlaxGPT2LMHeadModel, FlaxT5ForConditionalGeneration

    encoder_decoder = bool(config.num_encoder_layers)
    model = (FlaxT5ForConditionalGeneration if encoder_decoder else FlaxGPT2LMHeadModel)(hf_config(config), seed=0)
    # Flax has no min_new_tokens: min_length counts the decoder's whole sequence.
    min_length = (1 if encoder_decoder else prompts.shape[1]) + new_tokens
    start = {"decoder_start_token_id": 0} if encoder_decoder else {}

    @jax.jit
    def generate(params, input_ids):
        return model.generate(
            input_ids, params=params, max_new_tokens=new_tokens, min_length=min_length, do_sample=False,
            pad_token_id=0, **start,
        ).sequences

    params, input_ids = model.params, jax.device_put(prompts)
    return count(params), lambda: jax.block_until_ready(generate(params, input_ids))


def decoding_sides(config: tfm.ModelConfig, prompts: np.ndarray, new_tokens: int) -> dict[str, Side]:
    return {
        OURS: lambda: our_decoding(config, prompts, new_tokens),
        "hf-torch": lambda: hf_torch_decoding(config, prompts, new_tokens),
        "hf-flax": lambda: hf_flax_decoding(config, prompts, new_tokens),
    }


# ----------------------------------------------------------------------------- one side, in its own process


def seconds(run: Run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def case_sides(case: dict) -> tuple[tfm.ModelConfig, dict[str, Side]]:
    """The model and the sides of one comparison (`case`: what the parent passes to each process)."""
    if case["section"] == "train":
        return training_sides(case["compile"], case["layers"])
    config = (t5_config if case["family"] == "t5" else gpt_config)(case["full_size"])
    prompts = np.random.default_rng(case["batch"]).integers(7, config.vocab_size, (case["batch"], case["prompt_length"]))
    return config, decoding_sides(config, prompts.astype(np.int32), case["new_tokens"])


def settings(name: str) -> dict:
    """What a side ran with that its users could set otherwise."""
    if name in TORCH_SIDES:
        import torch

        return {"torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}
    return {"glibc_tunables": os.environ.get("GLIBC_TUNABLES", "default")}


def run_side(name: str, case: dict) -> None:
    """The child process: builds one side, times its first call and `case["calls"]` more, and
    prints them as the last line of its output (JSON); a peer that cannot build or run prints
    why instead."""
    if name == OURS and case["section"] == "train":
        reexec_with_huge_pages()  # as `python -m train` does
    if case.get("torch_threads") and name in TORCH_SIDES:
        import torch

        torch.set_num_threads(case["torch_threads"])
    try:
        parameters, run = case_sides(case)[1][name]()
        cpu = time.process_time()
        first_s = seconds(run)
        first_cpu_s = time.process_time() - cpu
    except Exception as error:  # an optional peer that the installed versions cannot run
        if name == OURS:
            raise
        print(json.dumps({"unavailable": f"{type(error).__name__}: {error}".splitlines()[0][:200]}))
        return
    calls_s = [seconds(run) for _ in range(case["calls"])]
    print(json.dumps({"parameters": parameters, "first_s": first_s, "first_cpu_s": first_cpu_s,
                      "call_s": statistics.median(calls_s), "calls_s": calls_s, "settings": settings(name)}))


# ----------------------------------------------------------------------------- the sides taking turns


def take_turns(names: list[str], case: dict, repeats: int, unavailable: dict[str, str]) -> dict[str, list[dict]]:
    """Every side's result in each of `repeats` rounds, one process per side and round, the
    order reversed every other round. A peer that cannot run is left out, its error noted in
    `unavailable`; all others must have our parameter count."""
    names = [name for name in names if name not in unavailable]
    results = {name: [] for name in names}
    for index in range(repeats):
        for name in names if index % 2 == 0 else names[::-1]:
            if name in unavailable:
                continue
            result = in_own_process(__file__, "--side", name, "--case", json.dumps(case))
            if "unavailable" in result:
                unavailable[name] = result["unavailable"]
                print(f"  {name}: unavailable ({result['unavailable']})")
                del results[name]
                continue
            results[name].append(result)
    counts = {name: {result["parameters"] for result in rounds} for name, rounds in results.items()}
    if len(set().union(*counts.values())) > 1:
        raise SystemExit(f"Parameter counts differ, the sides are not the same model: {counts}")
    return results


def side_rows(results: dict[str, list[dict]], tokens_per_call: int, **fields) -> list[dict]:
    """One row per side: its figures (the median over rounds, the range of tokens/s) and ours / side."""
    median = lambda name, key: statistics.median(result[key] for result in results[name])  # noqa: E731
    ours_call, ours_first = median(OURS, "call_s"), median(OURS, "first_s")
    rows = []
    for name, rounds in results.items():
        call_s = median(name, "call_s")
        rows.append({
            **fields, "side": name, "parameters": rounds[0]["parameters"], "settings": rounds[0]["settings"],
            "first_call_s": median(name, "first_s"), "first_call_cpu_s": median(name, "first_cpu_s"),
            "call_ms": 1000 * call_s, "round_ms": [1000 * result["call_s"] for result in rounds],
            "tokens_per_second": tokens_per_call / call_s,
            "tokens_per_second_range": [tokens_per_call / max(r["call_s"] for r in rounds),
                                        tokens_per_call / min(r["call_s"] for r in rounds)],
            "speed_ours_over_side": call_s / ours_call, "first_call_ours_over_side": ours_first / median(name, "first_s"),
        })
    for row in rows:
        low, high = row["tokens_per_second_range"]
        row["tokens_per_second_text"] = f"{row['tokens_per_second']:,.0f} ({low:,.0f}-{high:,.0f})"
    return rows


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (header, row key, format spec)."""
    table = [[header for header, _, _ in columns]]
    table += [[format(row[key], spec) for _, key, spec in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(f"{cell:>{width}}" for cell, width in zip(line, widths)))


COMMON_COLUMNS = [("side", "side", ""), ("parameters", "parameters", ","), ("first call s", "first_call_s", ".2f"),
                  ("first cpu s", "first_call_cpu_s", ".2f"), ("call ms", "call_ms", ".1f"),
                  ("tokens/s (rounds' range)", "tokens_per_second_text", ""),
                  ("tok/s ours/side", "speed_ours_over_side", ".2f"), ("first ours/side", "first_call_ours_over_side", ".2f")]


def train_section(args, unavailable: dict[str, str]) -> list[dict]:
    rows = []
    for layers in args.train_layers:
        case = {"section": "train", "layers": layers, "compile": args.compile, "calls": args.calls,
                "torch_threads": args.torch_threads}
        config, sides = case_sides(case)
        print(f"\ntraining: gpt2-small cut to {layers} layers x {config.d_model}, vocabulary {config.vocab_size}, "
              f"batch {TRAIN_BATCH} x {TRAIN_LENGTH}, float32; {args.repeats} rounds of {args.calls} steps")
        results = take_turns(list(sides), case, args.repeats, unavailable.setdefault(f"{layers} layers", {}))
        section = side_rows(results, TRAIN_BATCH * TRAIN_LENGTH, section="train", layers=layers,
                            batch=TRAIN_BATCH, length=TRAIN_LENGTH)
        print_table(section, COMMON_COLUMNS)
        rows += section
    return rows


def decode_section(args, unavailable: dict[str, dict[str, str]]) -> list[dict]:
    print(f"\ndecoding: greedy, KV cache, prompt {args.prompt_length}, {args.new_tokens} new tokens (no EOS), "
          f"float32; {args.repeats} rounds of {args.calls} calls")
    rows = []
    for family in ("gpt2", "t5"):
        for batch in args.batch_sizes:
            case = {"section": "decode", "family": family, "batch": batch, "prompt_length": args.prompt_length,
                    "new_tokens": args.new_tokens, "full_size": args.full_size, "calls": args.calls,
                    "torch_threads": args.torch_threads}
            config, sides = case_sides(case)
            print(f"{family} {config.num_encoder_layers}+{config.num_decoder_layers} layers x {config.d_model}, "
                  f"batch {batch}")
            results = take_turns(list(sides), case, args.repeats, unavailable.setdefault(family, {}))
            rows += side_rows(results, batch * args.new_tokens, section="decode", model=family, batch=batch)
    print()
    print_table(rows, [("model", "model", ""), ("batch", "batch", "d"), *COMMON_COLUMNS])
    return rows


def load_line() -> str:
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    busy = " (busy: other processes share the cores)" if load > cores else ""
    return f"load average {load:.2f} on {cores} cores{busy}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["train", "decode"], default=None, help="one section (default: both)")
    parser.add_argument("--calls", type=int, default=5, help="timed calls per process (training steps, or generate calls)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds: processes per side, the order alternating")
    parser.add_argument("--compile", action="store_true", help="training: add torch.compile (compiles for minutes)")
    parser.add_argument("--train-layers", type=int, nargs="+", default=[4], help="training: the GPT-2 shape's depths")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="decoding batch sizes")
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--full-size", action="store_true", help="decoding: gpt2-small (124M) and t5-small (60M)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch's threads (default: its own choice)")
    parser.add_argument("--out", default="benchmarks/results/compare.json")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # a child process: run this side of --case
    parser.add_argument("--case", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return run_side(args.side, args.case)
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"compare.py needs PyTorch and transformers ({', '.join(missing)} not installed); install a "
                         f"CPU build of torch:\n    {INSTALL}")
    versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers")}
    print(f"device: {workload.device_line()}; torch {versions['torch']}, transformers {versions['transformers']}; "
          f"each side in its own process; {load_line()}")
    load_start, unavailable, rows = os.getloadavg()[0], {}, []
    if args.only in (None, "train"):
        rows += train_section(args, unavailable.setdefault("train", {}))
    if args.only in (None, "decode"):
        rows += decode_section(args, unavailable.setdefault("decode", {}))
    print(load_line())
    write_results(args.out, rows, **versions, torch_threads=args.torch_threads, calls=args.calls,
                  repeats=args.repeats, prompt_length=args.prompt_length, new_tokens=args.new_tokens,
                  full_size=args.full_size, train_layers=args.train_layers, unavailable=unavailable,
                  load_average=[load_start, os.getloadavg()[0]])


if __name__ == "__main__":
    main()
