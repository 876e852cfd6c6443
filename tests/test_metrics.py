"""Training metrics read one step late: what a log interval reports, and what its clock counts."""

import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import preset
from train.metrics import IntervalMetrics, MetricsLog, head_weights, published_peak_flops, summarize, training_flops
from transformer.tasks import Task


def test_an_interval_reports_the_sums_of_its_steps_and_nothing_before_it_closes():
    interval = IntervalMetrics()
    interval.restart()
    for loss in (1.0, 2.0, 3.0):
        interval.add({"loss": jnp.float32(loss), "weight": jnp.float32(2.0), "correct": jnp.float32(1.0)})
    assert interval.read() is None  # still open
    interval.end_interval(30, {"total": jnp.int32(1)})
    interval.add({"loss": jnp.float32(100.0), "weight": jnp.float32(1.0), "correct": jnp.float32(0.0)})  # the next interval's first step
    step, sums, extra, steps, seconds = interval.read()
    assert (step, sums, extra, steps) == (30, {"loss": 6.0, "weight": 6.0, "correct": 3.0}, {"total": 1}, 3)
    assert summarize(sums)["loss"] == 1.0
    assert interval.read() is None  # read once


def test_time_spent_paused_is_left_out_of_the_interval():
    interval = IntervalMetrics()
    interval.restart()
    interval.add({"loss": jnp.float32(1.0), "weight": jnp.float32(1.0)})
    with interval.paused(jnp.zeros(())):
        time.sleep(0.3)
    interval.end_interval(1, {})
    *_, seconds = interval.read()
    assert seconds < 0.2


def test_a_full_disk_fails_the_log_write_that_meets_it_naming_the_file(tmp_path, monkeypatch):
    """TensorBoard events were written by tensorboardX's thread, which a full disk killed: the run
    then hung on its queue. Lines and events are written by the caller, and the error names the
    file (a failed write names none: "[Errno 28] No space left on device")."""
    monkeypatch.setattr(time, "time", lambda: 1.0)  # the events file's name
    events = tmp_path / "tensorboard" / f"events.out.tfevents.1.000000.{socket.gethostname()}"
    events.parent.mkdir()
    events.symlink_to("/dev/full")  # every write fails with ENOSPC
    log = MetricsLog(tmp_path, resume_step=-1)
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    with pytest.raises(OSError, match=rf"\[Errno 28\] No space left on device: '{tmp_path / 'metrics.jsonl'}'"):
        log.write(1, "train", {"loss": 1.0})
    (tmp_path / "metrics.jsonl").unlink()
    log.write(1, "train", {"loss": 1.0})  # the events are buffered: they meet the disk when flushed
    with pytest.raises(OSError, match=rf"\[Errno 28\] No space left on device: '{events}'"):
        log.close()
    log.close()  # closed all the same


def _matmul_flops(jaxpr) -> float:
    """2 x output size x contracted size of every dot_general in a jaxpr and its sub-jaxprs."""
    flops = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            flops += 2 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[i] for i in contract])
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    flops += _matmul_flops(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    flops += _matmul_flops(sub)
    return flops


@pytest.mark.parametrize("name, task, span_boundary_objective", [
    ("gpt2-tiny", Task.CAUSAL_LM, False), ("llama-tiny", Task.CAUSAL_LM, False), ("t5-tiny", Task.SEQ2SEQ, False),
    ("bert-tiny", Task.MASKED_LM, False), ("bert-tiny", Task.MASKED_LM, True),
])
def test_training_flops_are_three_times_the_forward_matrix_products(name, task, span_boundary_objective):
    """MFU's FLOP count (all T x T attention pairs) is 3 x the matrix products the forward pass
    really runs (counted in its jaxpr): gated activations, grouped-query heads, cross-attention,
    the masked-LM transform and SpanBERT's span boundary head included."""
    config = preset(name, scan_layers=False)
    model = task.model(config, span_boundary_objective=span_boundary_objective)
    length, source = 12, (8 if task == Task.SEQ2SEQ else 0)
    inputs = task.example_inputs(length, source)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)
    forward = jax.make_jaxpr(lambda p: model.apply(p, *inputs))(params)
    head = head_weights(config, task, span_boundary_objective=span_boundary_objective)
    counted = training_flops(config, length, source, head=head, causal_pairs="all")
    assert counted == pytest.approx(3 * _matmul_flops(forward.jaxpr), rel=1e-9)


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("TPU v6 lite", 918e12), ("TPU v5 lite", 197e12), ("cpu", None),
])
def test_the_published_peak_is_the_device_kinds_own_not_a_namesakes(kind, peak):
    """A name matches as whole words, variants first: an L40S is no L4, an H100 PCIe no H100 SXM."""
    assert published_peak_flops(kind) == peak
