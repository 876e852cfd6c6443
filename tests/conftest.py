"""Tiny-model builders shared by the tests (imported as `from conftest import ...`).

The test process compiles through the persistent compilation cache that its `python -m ...`
child processes share (`processes.py`): a program that several tests build afresh (the same
tiny model's step, a second `jax.jit` of the same function) is compiled once.
"""

import jax
import jax.numpy as jnp

import transformer as tfm
from processes import CACHE_SETTINGS

for _name, _value in CACHE_SETTINGS.items():
    jax.config.update(_name, _value)

RNG = jax.random.PRNGKey(0)


def preset(name: str, **changes) -> tfm.ModelConfig:
    """A preset without dropout, so that every forward pass is deterministic."""
    return tfm.ModelConfig.preset(
        name, dropout_rate=0.0, attention_dropout_rate=0.0, feed_forward_dropout_rate=0.0, **changes
    )


def init_inputs(model, length: int = 4) -> tuple[jax.Array, ...]:
    """Token ids [1, length] for `model.init`: (source, target) for a Seq2SeqLM, else (tokens,)."""
    tokens = jnp.ones((1, length), jnp.int32)
    return (tokens, tokens) if isinstance(model, tfm.Seq2SeqLM) else (tokens,)


def abstract_params(model, *inputs):
    """The parameters as shapes, boxed with their logical axis names (no memory, however large).

    inputs: the arguments of `model.init` (default `init_inputs(model)`).
    """
    return jax.eval_shape(model.init, RNG, *(inputs or init_inputs(model)))["params"]
