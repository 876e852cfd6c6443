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
from transformer.models import (
    CausalLM, DecoderClassifier, MaskedLM, QuestionAnswering, Seq2SeqLM, SequenceClassifier, TokenClassifier,
)

Layers = tuple[bool, bool]  # (has an encoder, has a decoder)


class Task(enum.StrEnum):
    CAUSAL_LM = "causal_lm"  # decoder-only next-token prediction (GPT)
    MASKED_LM = "masked_lm"  # encoder-only masked-token (+ next-sentence) prediction (BERT)
    SEQ2SEQ = "seq2seq"  # encoder-decoder translation (2017 Transformer, T5)
    CLASSIFICATION = "classification"  # one label per text: a pooled [CLS] head, or a decoder's last token (GPT)
    PAIR_CLASSIFICATION = "pair_classification"  # one label per pair of texts (entailment, paraphrase)
    SPAN_CORRUPTION = "span_corruption"  # encoder-decoder denoising of text (T5's pretraining)
    TEXT_TO_TEXT = "text_to_text"  # encoder-decoder classification, the label written as a word (T5)
    TOKEN_CLASSIFICATION = "token_classification"  # encoder body + a label per word (named entities)
    QUESTION_ANSWERING = "question_answering"  # encoder body + an answer's start and end in the context (SQuAD)
    DISTILLATION = "distillation"  # a smaller masked LM trained on a teacher's outputs and states (DistilBERT)

    @property
    def generates(self) -> bool:
        """Whether the task's model writes text (and so can be sampled)."""
        return self == Task.CAUSAL_LM or self.encoder_decoder

    @property
    def encoder_decoder(self) -> bool:
        """Whether the model reads a source and writes a target."""
        return self in (Task.SEQ2SEQ, Task.SPAN_CORRUPTION, Task.TEXT_TO_TEXT)

    @property
    def classifies(self) -> bool:
        """Whether the task gives one label per example (a text or a pair of texts)."""
        return self in (Task.CLASSIFICATION, Task.PAIR_CLASSIFICATION)

    @property
    def layers(self) -> tuple[Layers, ...]:
        """The stacks a model for the task may have, as (has an encoder, has a decoder): a
        classifier reads its text with an encoder (BERT) or a decoder alone (GPT)."""
        if self.classifies:
            return (True, False), (False, True)
        return ((self != Task.CAUSAL_LM, self == Task.CAUSAL_LM or self.encoder_decoder),)

    def model(self, config: ModelConfig, *, num_labels: int = 2, next_sentence_prediction: bool = False,
              span_boundary_objective: bool = False) -> nn.Module:
        """The task's model: `num_labels` for (token) classification, the NSP or SBO head for masked LM;
        a decoder-only config classifies with `DecoderClassifier`."""
        if self == Task.CAUSAL_LM:
            return CausalLM(config)
        if self == Task.DISTILLATION:
            return MaskedLM(config)
        if self == Task.MASKED_LM:
            return MaskedLM(config, next_sentence_prediction=next_sentence_prediction,
                            span_boundary_objective=span_boundary_objective)
        if self.encoder_decoder:
            return Seq2SeqLM(config)
        if self == Task.TOKEN_CLASSIFICATION:
            return TokenClassifier(config, num_labels=num_labels)
        if self == Task.QUESTION_ANSWERING:
            return QuestionAnswering(config)
        if not config.num_encoder_layers:
            return DecoderClassifier(config, num_labels=num_labels)
        return SequenceClassifier(config, num_labels=num_labels)

    def example_inputs(self, length: int = 1, source_length: int = 1) -> tuple[np.ndarray, ...]:
        """Positional inputs of one row for `model.init`: (source, target) or (tokens,)."""
        tokens = np.ones((1, length), np.int32)
        return (np.ones((1, source_length), np.int32), tokens) if self.encoder_decoder else (tokens,)
