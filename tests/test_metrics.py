"""Training metrics read one step late: what a log interval reports, and what its clock counts."""

import time

import jax.numpy as jnp

from train.metrics import IntervalMetrics, summarize


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
