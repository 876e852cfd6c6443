"""Presets: exact parameter counts against the reference implementations; the heads over the body."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

import transformer as tfm
from conftest import abstract_params



def count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


# Hugging Face `transformers` models built from their default configs: BertModel (with pooler),
# GPT2LMHeadModel and T5ForConditionalGeneration (tied heads); RobertaModel and AlbertModel (with
# pooler) and DistilBertModel (none) from roberta-base's, albert-base-v2's and albert-large-v2's,
# distilbert-base-uncased's config.json, BertModel from SpanBERT's (bert-base-cased's and
# bert-large-cased's: 28,996 tokens). The ALBERT paper (Table 1) rounds to 12M and 18M. The 2017 paper (Table 3) reports
# 65M and 213M with a shared vocabulary of about 37k tokens and rounds; with exactly 37,000
# tokens we count 63,082,496 and 214,245,376.
PUBLISHED = {
    "bert-base": 109_482_240, "bert-large": 335_141_888, "spanbert-base": 108_310_272, "spanbert-large": 333_579_264,
    "gpt2-small": 124_439_808, "gpt2-medium": 354_823_168,
    "t5-small": 60_506_624, "t5-base": 222_903_552,
    "roberta-base": 124_645_632, "roberta-large": 355_359_744,
    "albert-base": 11_683_584, "albert-large": 17_683_968, "distilbert-base": 66_362_880,
    "transformer-base": 63_082_496, "transformer-big": 214_245_376,
}
PAPER = {"transformer-base": 65e6, "transformer-big": 213e6, "albert-base": 12e6, "albert-large": 18e6}


def body_parameters(cfg) -> int:
    """Parameters of a preset's model as the reference counts it (BERT: the body with its pooler)."""
    if cfg.num_encoder_layers and cfg.num_decoder_layers:
        return count(abstract_params(tfm.Seq2SeqLM(cfg)))
    if cfg.num_decoder_layers:
        return count(abstract_params(tfm.CausalLM(cfg)))
    params = abstract_params(tfm.EncoderModel(cfg))
    if cfg.pooler == tfm.Pooler.RELU:  # DistilBERT's pre_classifier is its classification head's
        del params["pooler"]
    return count(params)


def test_every_full_preset_has_a_published_count():
    assert set(PUBLISHED) == {name for name in tfm.PRESETS if not name.endswith("-tiny")}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count(name):
    """Each full-size preset builds (shapes only, no memory) with exactly the published count."""
    n = body_parameters(tfm.ModelConfig.preset(name))
    assert n == PUBLISHED[name]
    if name in PAPER:
        assert abs(n - PAPER[name]) / PAPER[name] < 0.05


def test_task_heads_read_the_body():
    """Each encoder head is its published function of the body's hidden states [B, T, D],
    computed here in numpy: a token classifier reads every position, a sequence classifier
    and the NSP head BERT's pooled [CLS] (tanh of a dense layer), the MLM head every position."""
    cfg = tfm.ModelConfig.preset("bert-tiny")
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 1, cfg.vocab_size)
    rng = jax.random.PRNGKey(0)

    def dense(params, x):
        return x @ np.asarray(params["kernel"]) + np.asarray(params["bias"])

    models = {
        "token": tfm.TokenClassifier(cfg, num_labels=5),
        "sequence": tfm.SequenceClassifier(cfg, num_labels=3),
        "pretraining": tfm.MaskedLM(cfg, next_sentence_prediction=True),
    }
    for name, model in models.items():
        variables = jax.jit(model.init)(rng, tokens)
        params = nn.unbox(variables["params"])
        hidden = np.asarray(jax.jit(functools.partial(model.apply, method="encode"))(variables, tokens))  # [B, T, D]
        outputs = jax.jit(model.apply)(variables, tokens)
        if name == "token":
            np.testing.assert_allclose(outputs, dense(params["classifier"], hidden), atol=1e-5)
            continue
        pooled = np.tanh(dense(params["pooler"], hidden[:, 0]))  # [B, D]
        if name == "sequence":
            np.testing.assert_allclose(outputs, dense(params["classifier"], pooled), atol=1e-5)
        else:
            mlm, nsp = outputs
            np.testing.assert_allclose(nsp, dense(params["nsp_head"], pooled), atol=1e-5)
            assert np.abs(np.diff(np.asarray(mlm), axis=1)).max() > 1e-3  # positions differ


def test_shared_layers_do_not_grow_with_depth():
    """ALBERT's one set of layer parameters: 4 or 48 layers, the same count (BERT's grows by a
    layer's worth each time), and the scanned and unscanned stacks hold the same tree."""
    albert = tfm.ModelConfig.preset("albert-tiny")
    shallow, deep = (count(abstract_params(tfm.EncoderModel(albert.replace(num_encoder_layers=n)))) for n in (4, 48))
    assert shallow == deep
    unscanned = abstract_params(tfm.EncoderModel(albert.replace(scan_layers=False)))
    scanned = abstract_params(tfm.EncoderModel(albert))
    assert jax.tree.map(lambda x: x.shape, nn.unbox(unscanned)) == jax.tree.map(lambda x: x.shape, nn.unbox(scanned))
    bert = tfm.ModelConfig.preset("bert-tiny")
    assert count(abstract_params(tfm.EncoderModel(bert.replace(num_encoder_layers=3)))) > count(
        abstract_params(tfm.EncoderModel(bert.replace(num_encoder_layers=2))))
