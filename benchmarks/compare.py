"""Our training step and decoding loop against PyTorch and Hugging Face, side by side in one process.

    pip install torch==2.13.0 transformers==4.57.6      # the peers (a CPU build of torch)
    python benchmarks/compare.py [--only train|decode] [--steps 5] [--repeats 3] [--compile]
        [--train-layers 4] [--batch-sizes 1 8] [--prompt-length 32] [--new-tokens 64] [--full-size]
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

Each side is called once first (compiling, warming caches): that call's wall time, and its CPU
time in this process (steadier on a busy machine; torch.compile's compile workers are other
processes, not counted). Then `--repeats` rounds run every side in turn, the order reversed
each round so that drift on a shared machine favours no side; a training round times `--steps`
steps and takes their median, a decoding round one call. A side's figure is the median over
rounds (the JSON keeps every round's). Ratios are ours / side: tokens/s (> 1: ours is faster)
and first call (> 1: ours takes longer).

torch uses `--torch-threads` threads (default os.cpu_count()) and, unless OMP_WAIT_POLICY is
set, OMP_WAIT_POLICY=PASSIVE: its spinning OpenMP threads otherwise run many times slower while
other processes hold the cores (XLA's threads block). The load average is printed and recorded
before and after; figures from a busy machine are noisy.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import optax

import transformer as tfm
import workload
from report import write_results
from train.hugepages import reexec_with_huge_pages
from train.optim import make_optimizer
from transformer.architectures import ARCHITECTURES

INSTALL = "pip install torch==2.13.0 transformers==4.57.6"
OURS = "ours"
TRAIN_BATCH, TRAIN_LENGTH = 8, 256
LEARNING_RATE = 1e-4  # workload.training_step's; the rest of AdamW is make_optimizer's defaults
ADAMW = dict(lr=LEARNING_RATE, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)
CLIP_NORM = 1.0
NO_DROPOUT = dict(dropout_rate=0.0, attention_dropout_rate=0.0)
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


# ----------------------------------------------------------------------------- measuring


def seconds(run: Run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


class Started(NamedTuple):
    parameters: int
    run: Run
    first_s: float  # the first call's wall time
    first_cpu_s: float  # and its CPU time in this process (steadier than wall time on a busy machine)


def start(sides: dict[str, Side], unavailable: dict[str, str]) -> dict[str, Started]:
    """Builds each side and times its first call.

    A peer that fails to build or run is left out, its error noted in `unavailable`; all
    others must have our parameter count.
    """
    started = {}
    for name, build in sides.items():
        try:
            parameters, run = build()
            cpu = time.process_time()
            started[name] = Started(parameters, run, seconds(run), time.process_time() - cpu)
        except Exception as error:  # an optional peer that the installed versions cannot run
            if name == OURS:
                raise
            unavailable[name] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            print(f"  {name}: unavailable ({unavailable[name]})")
    counts = {name: side.parameters for name, side in started.items()}
    if len(set(counts.values())) > 1:
        raise SystemExit(f"Parameter counts differ, the sides are not the same model: {counts}")
    return started


def rounds(started: dict[str, Started], calls: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each side in each of `repeats` rounds (the median of `calls` calls),
    the sides' order reversed every other round."""
    names = list(started)
    medians = {name: [] for name in names}
    for index in range(repeats):
        for name in names if index % 2 == 0 else names[::-1]:
            medians[name].append(statistics.median(seconds(started[name].run) for _ in range(calls)))
    return medians


def side_rows(started: dict[str, Started], per_round: dict[str, list[float]], tokens_per_call: int,
              **fields) -> list[dict]:
    """One row per side: its figures (the median over rounds) and ours / side."""
    per_call = {name: statistics.median(values) for name, values in per_round.items()}
    ours = started[OURS]
    return [
        {
            **fields, "side": name, "parameters": side.parameters, "first_call_s": side.first_s,
            "first_call_cpu_s": side.first_cpu_s, "call_ms": 1000 * per_call[name],
            "round_ms": [1000 * value for value in per_round[name]],
            "tokens_per_second": tokens_per_call / per_call[name],
            "speed_ours_over_side": per_call[name] / per_call[OURS],
            "first_call_ours_over_side": ours.first_s / side.first_s,
        }
        for name, side in started.items()
    ]


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (header, row key, format spec)."""
    table = [[header for header, _, _ in columns]]
    table += [[format(row[key], spec) for _, key, spec in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(f"{cell:>{width}}" for cell, width in zip(line, widths)))


def train_section(args, unavailable: dict[str, str]) -> list[dict]:
    config, sides = training_sides(args.compile, args.train_layers)
    print(f"\ntraining: gpt2-small cut to {config.num_decoder_layers} layers x {config.d_model}, vocabulary "
          f"{config.vocab_size}, batch {TRAIN_BATCH} x {TRAIN_LENGTH}, float32; median of {args.repeats} rounds "
          f"of {args.steps} steps")
    started = start(sides, unavailable)
    rows = side_rows(started, rounds(started, args.steps, args.repeats), TRAIN_BATCH * TRAIN_LENGTH,
                     section="train", batch=TRAIN_BATCH, length=TRAIN_LENGTH)
    print_table(rows, [("side", "side", ""), ("parameters", "parameters", ","), ("first step s", "first_call_s", ".2f"),
                       ("first cpu s", "first_call_cpu_s", ".2f"), ("step ms", "call_ms", ".1f"),
                       ("tokens/s", "tokens_per_second", ",.0f"), ("tok/s ours/side", "speed_ours_over_side", ".2f"),
                       ("first ours/side", "first_call_ours_over_side", ".2f")])
    return rows


def decode_section(args, unavailable: dict[str, dict[str, str]]) -> list[dict]:
    print(f"\ndecoding: greedy, KV cache, prompt {args.prompt_length}, {args.new_tokens} new tokens (no EOS), "
          f"float32; median of {args.repeats} rounds")
    rows = []
    for family, config in (("gpt2", gpt_config(args.full_size)), ("t5", t5_config(args.full_size))):
        for batch in args.batch_sizes:
            print(f"{family} {config.num_encoder_layers}+{config.num_decoder_layers} layers x {config.d_model}, "
                  f"batch {batch}")
            prompts = np.random.default_rng(batch).integers(7, config.vocab_size, (batch, args.prompt_length))
            started = start(decoding_sides(config, prompts.astype(np.int32), args.new_tokens),
                            unavailable.setdefault(family, {}))
            rows += side_rows(started, rounds(started, 1, args.repeats), batch * args.new_tokens,
                              section="decode", model=family, batch=batch)
    print()
    print_table(rows, [("model", "model", ""), ("batch", "batch", "d"), ("side", "side", ""),
                       ("parameters", "parameters", ","), ("first call s", "first_call_s", ".2f"),
                       ("first cpu s", "first_call_cpu_s", ".2f"), ("call ms", "call_ms", ".1f"),
                       ("new tok/s", "tokens_per_second", ",.1f"), ("tok/s ours/side", "speed_ours_over_side", ".2f"),
                       ("first ours/side", "first_call_ours_over_side", ".2f")])
    return rows


def load_line() -> str:
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    busy = " (busy: other processes share the cores)" if load > cores else ""
    return f"load average {load:.2f} on {cores} cores{busy}"


def main():
    reexec_with_huge_pages()  # as `python -m train` does; GLIBC_TUNABLES=glibc.malloc.hugetlb=0: without
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["train", "decode"], default=None, help="one section (default: both)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per side per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per section, the sides' order alternating")
    parser.add_argument("--compile", action="store_true", help="training: add torch.compile (compiles for minutes)")
    parser.add_argument("--train-layers", type=int, default=4, help="training: the GPT-2 shape's depth")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="decoding batch sizes")
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--full-size", action="store_true", help="decoding: gpt2-small (124M) and t5-small (60M)")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="benchmarks/results/compare.json")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP
    try:
        import torch
        import transformers
    except ImportError as error:
        raise SystemExit(f"compare.py needs PyTorch and transformers ({error}); install a CPU build of torch:\n"
                         f"    {INSTALL}")

    torch.set_num_threads(args.torch_threads)
    print(f"device: {workload.device_line()}; torch {torch.__version__} ({args.torch_threads} threads, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), transformers {transformers.__version__}; {load_line()}")
    load_start, unavailable, rows = os.getloadavg()[0], {}, []
    if args.only in (None, "train"):
        rows += train_section(args, unavailable.setdefault("train", {}))
    if args.only in (None, "decode"):
        rows += decode_section(args, unavailable.setdefault("decode", {}))
    print(load_line())
    write_results(args.out, rows, torch=torch.__version__, transformers=transformers.__version__,
                  torch_threads=args.torch_threads, omp_wait_policy=os.environ["OMP_WAIT_POLICY"], steps=args.steps,
                  repeats=args.repeats, prompt_length=args.prompt_length, new_tokens=args.new_tokens,
                  full_size=args.full_size, train_layers=args.train_layers, unavailable=unavailable,
                  load_average=[load_start, os.getloadavg()[0]])


if __name__ == "__main__":
    main()
