"""The tasks a model is trained for, by name, and the model each one builds.

A run directory records its task (`task:` in config.yaml); `Task(name)` turns it back into the
model, for the sampler, for loading a pretrained body and for fine-tuning. The training side
of each task (its data, loss and evaluation) is `train.tasks`, keyed by these same names:
the library knows what a task's model is, the training job how to train it.
"""

from __future__ import annotations

import enum

import flax.linen as nn
import numpy as np

from transformer.config import ModelConfig
from transformer.models import CausalLM, MaskedLM, Seq2SeqLM, SequenceClassifier


class Task(enum.StrEnum):
    CAUSAL_LM = "causal_lm"  # decoder-only next-token prediction (GPT)
    MASKED_LM = "masked_lm"  # encoder-only masked-token (+ next-sentence) prediction (BERT)
    SEQ2SEQ = "seq2seq"  # encoder-decoder translation (2017 Transformer, T5)
    CLASSIFICATION = "classification"  # encoder body + pooled [CLS] head, one label per text

    @property
    def generates(self) -> bool:
        """Whether the task's model writes text (and so can be sampled)."""
        return self in (Task.CAUSAL_LM, Task.SEQ2SEQ)

    @property
    def encoder_decoder(self) -> bool:
        """Whether the model reads a source and writes a target."""
        return self == Task.SEQ2SEQ

    @property
    def layers(self) -> tuple[bool, bool]:
        """(needs an encoder, needs a decoder)."""
        return {
            Task.CAUSAL_LM: (False, True),
            Task.MASKED_LM: (True, False),
            Task.SEQ2SEQ: (True, True),
            Task.CLASSIFICATION: (True, False),
        }[self]

    def model(self, config: ModelConfig, *, num_labels: int = 2, next_sentence_prediction: bool = False) -> nn.Module:
        """The task's model: `num_labels` for classification, the NSP head for masked LM."""
        if self == Task.CAUSAL_LM:
            return CausalLM(config)
        if self == Task.MASKED_LM:
            return MaskedLM(config, next_sentence_prediction=next_sentence_prediction)
        if self == Task.SEQ2SEQ:
            return Seq2SeqLM(config)
        return SequenceClassifier(config, num_labels=num_labels)

    def example_inputs(self, length: int = 1, source_length: int = 1) -> tuple[np.ndarray, ...]:
        """Positional inputs of one row for `model.init`: (source, target) or (tokens,)."""
        tokens = np.ones((1, length), np.int32)
        return (np.ones((1, source_length), np.int32), tokens) if self.encoder_decoder else (tokens,)
