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
from transformer.models import CausalLM, MaskedLM, Seq2SeqLM, SequenceClassifier, TokenClassifier


class Task(enum.StrEnum):
    CAUSAL_LM = "causal_lm"  # decoder-only next-token prediction (GPT)
    MASKED_LM = "masked_lm"  # encoder-only masked-token (+ next-sentence) prediction (BERT)
    SEQ2SEQ = "seq2seq"  # encoder-decoder translation (2017 Transformer, T5)
    CLASSIFICATION = "classification"  # encoder body + pooled [CLS] head, one label per text
    SPAN_CORRUPTION = "span_corruption"  # encoder-decoder denoising of text (T5's pretraining)
    TEXT_TO_TEXT = "text_to_text"  # encoder-decoder classification, the label written as a word (T5)
    TOKEN_CLASSIFICATION = "token_classification"  # encoder body + a label per word (named entities)

    @property
    def generates(self) -> bool:
        """Whether the task's model writes text (and so can be sampled)."""
        return self == Task.CAUSAL_LM or self.encoder_decoder

    @property
    def encoder_decoder(self) -> bool:
        """Whether the model reads a source and writes a target."""
        return self in (Task.SEQ2SEQ, Task.SPAN_CORRUPTION, Task.TEXT_TO_TEXT)

    @property
    def layers(self) -> tuple[bool, bool]:
        """(needs an encoder, needs a decoder)."""
        return (self != Task.CAUSAL_LM, self == Task.CAUSAL_LM or self.encoder_decoder)

    def model(self, config: ModelConfig, *, num_labels: int = 2, next_sentence_prediction: bool = False,
              span_boundary_objective: bool = False) -> nn.Module:
        """The task's model: `num_labels` for (token) classification, the NSP or SBO head for masked LM."""
        if self == Task.CAUSAL_LM:
            return CausalLM(config)
        if self == Task.MASKED_LM:
            return MaskedLM(config, next_sentence_prediction=next_sentence_prediction,
                            span_boundary_objective=span_boundary_objective)
        if self.encoder_decoder:
            return Seq2SeqLM(config)
        if self == Task.TOKEN_CLASSIFICATION:
            return TokenClassifier(config, num_labels=num_labels)
        return SequenceClassifier(config, num_labels=num_labels)

    def example_inputs(self, length: int = 1, source_length: int = 1) -> tuple[np.ndarray, ...]:
        """Positional inputs of one row for `model.init`: (source, target) or (tokens,)."""
        tokens = np.ones((1, length), np.int32)
        return (np.ones((1, source_length), np.int32), tokens) if self.encoder_decoder else (tokens,)
