"""What a run reports: metric means, throughput and MFU, the metrics log and the loss plot.

Metrics leave the step as sums (see train.objectives); `summarize` divides them once. The
training metrics of a log interval are summed on the device and read one step late
(`IntervalMetrics`), so that logging never waits for the step it logs.
"""

from __future__ import annotations

import contextlib
import math
import pathlib
import re
import socket
import time
from typing import Any

import jax

from train import rundir
from train.config import TrainConfig
from transformer.config import ModelConfig
from transformer.tasks import Task

EVENTS_FLUSH_SECONDS = 30  # how often the TensorBoard events are flushed to disk (and at the end)
# Dense bfloat16 peak FLOP/s per device, by a name that `jax.Device.device_kind` holds as whole
# words ("L4" is not an L40S); the first match counts, so a variant comes before its family.
PEAK_FLOPS = {
    "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "GH200": 989e12, "H200": 989e12, "A100": 312e12,
    "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 125e12,
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12,
}


def summarize(sums: dict[str, float], *, token_level: bool = True) -> dict[str, float]:
    """Metric sums -> means: loss (cross-entropy) per weighted token (or example), perplexity
    (token-level tasks), accuracy, and when present the label-smoothed loss the step minimises
    and the next-sentence and span boundary losses and accuracies, and a distillation's KL (per
    masked token) and cosine (per token) losses."""
    weight = max(sums["weight"], 1e-9)
    out = {"loss": sums["loss"] / weight, "accuracy": sums["correct"] / weight}
    if token_level:
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    if "smoothed_loss" in sums:
        out["smoothed_loss"] = sums["smoothed_loss"] / weight
    if "nsp_weight" in sums:
        nsp_weight = max(sums["nsp_weight"], 1e-9)
        out["nsp_loss"] = sums["nsp_loss"] / nsp_weight
        out["nsp_accuracy"] = sums["nsp_correct"] / nsp_weight
    if "sbo_loss" in sums:
        out["sbo_loss"] = sums["sbo_loss"] / weight
        out["sbo_accuracy"] = sums["sbo_correct"] / weight
    if "kl_loss" in sums:
        out["kl_loss"] = sums["kl_loss"] / weight
    if "cosine_loss" in sums:
        out["cosine_loss"] = sums["cosine_loss"] / max(sums["token_weight"], 1e-9)
    return out


def add(sums, metrics):
    """Elementwise sum of two metric trees (`sums` None: the first)."""
    return metrics if sums is None else jax.tree.map(lambda a, b: a + b, sums, metrics)


def to_host(tree) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def tokens_per_step(config: TrainConfig) -> int:
    """Tokens a step reads: the target length, plus the source length of an encoder-decoder."""
    return config.batch_size * (config.seq_length + (config.source_length if config.task.encoder_decoder else 0))


def matmul_weights(model: ModelConfig, head: int | None = None) -> tuple[int, int]:
    """(per encoder token, per decoder token) weights that take part in a matrix product: every
    projection of every layer, plus the output head's `head` weights (default d_model x vocab)
    on the decoder's tokens (encoder-only: the encoder's). Cross-attention keys and values are
    projections of encoder tokens. The embedding lookup, norms and biases are not counted."""
    d = model.d_model
    queries_outputs, keys_values = 2 * d * model.head_dim * model.num_heads, 2 * d * model.head_dim * model.num_kv_heads
    feed_forward = d * model.d_ff * (3 if model.activation.gated else 2)
    layer = queries_outputs + keys_values + feed_forward
    head = d * model.vocab_size if head is None else head
    if not model.num_decoder_layers:
        return model.num_encoder_layers * layer + head, 0
    encoder = model.num_encoder_layers * layer
    decoder = model.num_decoder_layers * layer + head
    if model.num_encoder_layers:  # cross-attention
        encoder += model.num_decoder_layers * keys_values
        decoder += model.num_decoder_layers * queries_outputs
    return encoder, decoder


def training_flops(model: ModelConfig, length: int, source_length: int = 0, *, head: int | None = None,
                   causal_pairs: str = "attended") -> float:
    """Training FLOPs of one row (forward and backward, 3 x the forward pass).

    Matrix products: 6 per `matmul_weights` per token (`head`: the output head's weights per
    token, default d_model x vocab). Attention: 12 x heads x head_dim per (query, key) pair per
    layer (scores and weighted values). Causal self-attention counts the pairs the mask allows,
    T (T + 1) / 2 (`causal_pairs="attended"`, what a kernel that skips masked blocks computes),
    or all T x T (`"all"`: the PaLM / nanoGPT convention).
    length: the decoder's tokens (the encoder's, encoder-only); source_length: the encoder's.
    """
    encoder_weights, decoder_weights = matmul_weights(model, head)
    pair = 12 * model.num_heads * model.head_dim
    causal = length * (length + 1) / 2 if causal_pairs == "attended" else length**2
    if not model.num_decoder_layers:  # encoder-only: bidirectional over `length`
        return 6 * encoder_weights * length + pair * model.num_encoder_layers * length**2
    flops = 6 * decoder_weights * length + pair * model.num_decoder_layers * causal
    if model.num_encoder_layers:
        flops += 6 * encoder_weights * source_length + pair * model.num_encoder_layers * source_length**2
        flops += pair * model.num_decoder_layers * length * source_length  # cross-attention
    return flops


def head_weights(model: ModelConfig, task: Task, *, span_boundary_objective: bool = False) -> int:
    """Per-token weights of the task's output head: the vocabulary projection (masked LM: and
    its d x d transform; with SpanBERT's span boundary head also its 3d -> d and d -> d layers
    and the projection again); none counted for classification (one pooled row per example), token
    classification (a few labels) and question answering (two logits a token)."""
    d, vocab = model.d_model, model.vocab_size
    masked_lm = (d * vocab + d * d) + span_boundary_objective * (3 * d * d + d * d + d * vocab)
    if task.classifies or task in (Task.TOKEN_CLASSIFICATION, Task.QUESTION_ANSWERING):
        return 0
    return masked_lm if task in (Task.MASKED_LM, Task.DISTILLATION) else d * vocab  # distillation: the student's


def flops_per_step(config: TrainConfig) -> float:
    """Training FLOPs of one step (`training_flops` of each row)."""
    source = config.source_length if config.task.encoder_decoder else 0
    head = head_weights(config.model, config.task, span_boundary_objective=config.span_boundary_objective)
    return config.batch_size * training_flops(config.model, config.seq_length, source, head=head)


def published_peak_flops(device_kind: str) -> float | None:
    """The published dense bfloat16 peak of a device kind ("NVIDIA H100 80GB HBM3"), if known."""
    return next((flops for name, flops in PEAK_FLOPS.items()
                 if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", device_kind, re.IGNORECASE)), None)


def peak_flops_per_device(config: TrainConfig) -> float | None:
    """The configured peak, or the known bfloat16 peak of this accelerator (None on CPUs)."""
    return config.peak_flops or published_peak_flops(jax.devices()[0].device_kind)


class IntervalMetrics:
    """The training metrics of one log interval: summed on the device as steps are dispatched,
    read on the host one step after the interval ends.

    Reading waits for the interval's last step; by then the next step is queued, so the device
    never idles while the host logs. Steps per second are timed between two reads, each made
    when an interval's last step has finished.
    """

    def __init__(self):
        self._sums, self._timed, self._pending = None, 0, None
        self._clock = None  # when the last read (or `restart`) happened

    def restart(self) -> None:
        """Starts timing from now: the steps added so far (the first, compiling one) are not timed."""
        self._clock = time.perf_counter()
        self._timed = 0

    @contextlib.contextmanager
    def paused(self, state):
        """Leaves the time spent inside (an evaluation) out of the interval's duration, once
        `state` (the last step's output) is computed: the steps still queued count."""
        jax.block_until_ready(state)
        start = time.perf_counter()
        yield
        self._clock += time.perf_counter() - start

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self._sums = add(self._sums, metrics)
        self._timed += 1

    def open_sums(self) -> dict[str, jax.Array] | None:
        """The sums of the interval's steps so far (None before its first step)."""
        return self._sums

    def end_interval(self, step: int, extra: dict[str, jax.Array]) -> None:
        """Closes the interval at `step`; `extra` (device values) is read with it."""
        self._pending = (step, self._sums, self._timed, extra)
        self._sums, self._timed = None, 0

    def read(self) -> tuple[int, dict[str, float], dict[str, float], int, float] | None:
        """(step, metric sums, extra values, timed steps, their seconds) of the closed interval,
        or None. The sums cover every step of the interval, the timing all but a first step."""
        if self._pending is None:
            return None
        step, sums, steps, extra = self._pending
        self._pending = None
        sums, extra = jax.device_get((sums, extra))
        now = time.perf_counter()
        elapsed, self._clock = now - self._clock, now
        return step, {k: float(v) for k, v in (sums or {}).items()}, {k: int(v) for k, v in extra.items()}, steps, elapsed


class MetricsLog:
    """metrics.jsonl and TensorBoard events (process 0 only; the others write nothing).

    Opening it keeps the records up to `resume_step` (what a killed run logged after its last
    checkpoint goes, so the log reads as if the run never stopped) and drops lines a crash tore.
    Events are written in the calling thread, like the lines, so a full disk fails the write that
    meets it, naming the file (tensorboardX's SummaryWriter writes in a thread, which dies of it,
    and then blocks the run once its queue is full).
    """

    def __init__(self, run_dir: pathlib.Path, resume_step: int, say=print):
        self.enabled = jax.process_index() == 0
        self.path = run_dir / "metrics.jsonl"
        self.events_path = run_dir / "tensorboard" / f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}"
        self.events = None
        if not self.enabled:
            return
        if self.path.exists():
            records, damaged = rundir.read_metrics(self.path)
            if damaged:
                say(f"{self.path}: dropped line(s) {', '.join(map(str, damaged))}, which a crash or a full disk "
                    "cut off.")
            rundir.rewrite(self.path, [r for r in records if r["step"] <= resume_step])
        from tensorboardX.record_writer import RecordWriter  # imported on use (0.2 s), as below

        with _naming(self.events_path):
            self.events_path.parent.mkdir(exist_ok=True)
            self.events = RecordWriter(str(self.events_path))
            self._add(file_version="brain.Event:2")
            if resume_step >= 0:  # TensorBoard drops the events after resume_step (a killed run's), as above
                from tensorboardX.proto.event_pb2 import SessionLog

                self._add(step=resume_step + 1, session_log=SessionLog(status=SessionLog.START))
        self._flushed = time.monotonic()

    def write(self, step: int, split: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from tensorboardX.summary import scalar, text

        with _naming(self.path):
            rundir.append_line(self.path, {"step": step, "split": split, **values})
        with _naming(self.events_path):
            for key, value in values.items():
                self._add(step=step, summary=(text if isinstance(value, str) else scalar)(f"{split}/{key}", value))
            if time.monotonic() - self._flushed > EVENTS_FLUSH_SECONDS:
                self.events.flush()
                self._flushed = time.monotonic()

    def close(self) -> None:
        """Writes the last events to disk and closes their file (even when the writing fails)."""
        events, self.events = self.events, None
        if events is not None:
            with _naming(self.events_path):
                try:
                    events.flush()
                finally:
                    events.close()

    def _add(self, **fields) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self.events.write(Event(wall_time=time.time(), **fields).SerializeToString())


@contextlib.contextmanager
def _naming(path: pathlib.Path):
    """Names `path` in the error of a failed write, which names no file (e.g. "[Errno 28] No space left on device")."""
    try:
        yield
    except OSError as error:
        if error.filename is None:
            error.filename = str(path)
        raise


def plot_losses(metrics_path: pathlib.Path, output: pathlib.Path) -> None:
    """loss.png: training loss (per log interval) and validation loss against the step, beside
    the next-sentence loss with its chance level (ln 2) when the run has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, _ = rundir.read_metrics(metrics_path)
    names = [name for name in ("loss", "nsp_loss") if name == "loss" or any(name in r for r in records)]
    figure, panels = plt.subplots(1, len(names), figsize=(7 * len(names), 4), squeeze=False)
    for axes, name in zip(panels[0], names):
        for split, style in (("train", "-"), ("validation", "o-")):
            points = [(r["step"], r[name]) for r in records if r["split"] == split and name in r]
            if points:
                axes.plot(*zip(*points), style, label=split)
        for r in records:
            if name == "loss" and r["split"] == "baseline" and "unigram_loss" in r:
                axes.axhline(r["unigram_loss"], color="gray", linestyle="--", label="unigram baseline")
        if name == "nsp_loss":
            axes.axhline(math.log(2), color="gray", linestyle="--", label="chance (ln 2)")
        axes.set_xlabel("step")
        axes.set_ylabel("next-sentence loss" if name == "nsp_loss" else "loss")
        axes.set_title(output.parent.name + (": next-sentence prediction" if name == "nsp_loss" else ""))
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)
