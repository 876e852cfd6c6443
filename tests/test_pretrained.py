"""Published checkpoints: parity with the reference implementation, round trips, and bad input.

The fixtures under tests/fixtures/pretrained are small randomly initialised Hugging Face models
with their outputs on fixed inputs, made by tests/fixtures/make_pretrained.py (PyTorch and
transformers, run by hand); these tests need neither.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformer as tfm
from transformer.architectures import UnsupportedCheckpoint
from transformer.config import Activation
from transformer.files import file_digests, sha256_file
from transformer import pretrained as pretrained_module
from transformer.pretrained import DIGESTS, checkpoint_config

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "pretrained"
NAMES = ("bert", "bert-body", "gpt2", "llama", "t5", "t5-v1_1")
# The family's variants and heads: RoBERTa, DistilBERT, ALBERT, question answering, decoder classifiers.
FAMILY = ("roberta", "roberta-classify", "roberta-tokens", "roberta-qa", "bert-qa", "distilbert",
          "distilbert-classify", "albert", "albert-classify", "gpt2-classify", "llama-classify")
_loaded: dict[tuple, tfm.Pretrained] = {}


def load(name: str, **options) -> tfm.Pretrained:
    """Each fixture opened once per option set."""
    key = (name, *sorted(options.items()))
    if key not in _loaded:
        _loaded[key] = tfm.from_pretrained(FIXTURES / name, **options)
    return _loaded[key]


def reference(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / name / "reference.npz"))


def source_config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


def outputs(loaded: tfm.Pretrained, ref: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """This library's outputs on the reference inputs, each with the mask of its real positions."""
    model, variables = loaded.model, {"params": loaded.params}
    tokens, mask = ref["input_ids"], ref["attention_mask"].astype(bool)
    segments = mask.astype(np.int32)
    if isinstance(model, tfm.Seq2SeqLM):
        target_mask = ref["decoder_attention_mask"].astype(bool)
        encoded = model.apply(variables, tokens, segment_ids=segments, method="encode")
        logits = model.apply(variables, tokens, ref["decoder_input_ids"], source_segment_ids=segments,
                             target_segment_ids=target_mask.astype(np.int32))
        return {"encoder_hidden_states": (encoded, mask), "logits": (logits, target_mask)}
    if isinstance(model, (tfm.CausalLM, tfm.DecoderClassifier)):
        logits = model.apply(variables, tokens, segment_ids=segments)
        return {"logits": (logits, mask if isinstance(model, tfm.CausalLM) else None)}
    types = ref.get("token_type_ids")  # DistilBERT has none
    hidden = model.apply(variables, tokens, token_types=types, segment_ids=segments, method="encode")
    found = {"hidden_states": (hidden, mask)}
    output = model.apply(variables, tokens, token_types=types, segment_ids=segments)
    if isinstance(model, tfm.MaskedLM) and model.next_sentence_prediction:
        logits, pair_logits = output  # BERT's next-sentence or ALBERT's sentence-order logits
        return found | {"logits": (logits, mask), "nsp_logits" if "nsp_logits" in ref else "sop_logits": (pair_logits, None)}
    if isinstance(model, (tfm.MaskedLM, tfm.TokenClassifier)):
        return found | {"logits": (output, mask)}
    if isinstance(model, tfm.SequenceClassifier):
        return found | {"logits": (output, None)}
    if isinstance(model, tfm.QuestionAnswering):
        return found | {"start_logits": (output[0], mask), "end_logits": (output[1], mask)}
    pooled = model.apply(variables, hidden, method="pool")
    return found | {"sentence_embedding": (tfm.sentence_embedding(hidden, mask), None), "pooler_output": (pooled, None)}


@pytest.mark.parametrize("name", NAMES + FAMILY)
def test_outputs_match_the_reference_implementation(name):
    ref = reference(name)
    found = outputs(load(name), ref)
    assert set(ref) - set(found) <= {"input_ids", "attention_mask", "token_type_ids", "greedy_prompt",
                                     "greedy_source", "greedy_tokens", "decoder_input_ids",
                                     "decoder_attention_mask", "decoder_hidden_states", "hidden_states"}, "an output left unchecked"
    for key, (value, mask) in found.items():
        difference = np.abs(np.asarray(value) - ref[key])
        assert (difference if mask is None else difference[mask]).max() < 1e-4, key


@pytest.mark.parametrize(
    "name, activation, epsilon, tied",
    [("bert", Activation.GELU, 1e-12, True), ("gpt2", Activation.GELU_TANH, 1e-5, True),
     ("llama", Activation.SWIGLU, 1e-6, False), ("t5", Activation.RELU, 1e-6, True),
     ("t5-v1_1", Activation.GEGLU_TANH, 1e-6, False)],
)
def test_config_fields_read_from_config_json(name, activation, epsilon, tied):
    """Random small models hide activation and epsilon mistakes: the fields are checked directly."""
    config, hf = load(name).config, source_config(name)
    assert (config.activation, config.norm_epsilon, config.tie_embeddings) == (activation, epsilon, tied)
    assert config.vocab_size == hf["vocab_size"]
    if name.startswith("t5"):
        assert config.head_dim == hf["d_kv"] and not config.attention_logit_scaling
        assert config.rescale_tied_logits == tied  # T5 scales tied logits by d_model**-0.5 only
        # T5 drops out attention weights and feed-forward activations at its one rate (training only)
        assert config.attention_dropout_rate == config.feed_forward_dropout_rate == hf["dropout_rate"]
    if name == "llama":
        assert (config.num_heads, config.num_kv_heads) == (hf["num_attention_heads"], hf["num_key_value_heads"])


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_greedy_generation_matches_the_reference(name):
    loaded, ref = load(name), reference(name)
    prompt = ref["greedy_source" if name == "t5" else "greedy_prompt"]
    bos = {"bos_id": source_config(name)["decoder_start_token_id"]} if name == "t5" else {}
    output = tfm.generate(loaded.model, {"params": loaded.params}, prompt, max_new_tokens=8, **bos)
    np.testing.assert_array_equal(np.asarray(output.tokens), ref["greedy_tokens"])


@pytest.mark.parametrize("name", NAMES + FAMILY)
def test_tokenizer_matches_the_reference(name):
    expected = json.loads((FIXTURES / name / "tokenizer_reference.json").read_text())
    tokenizer = load(name).tokenizer
    assert [tokenizer.encode(text) for text in expected["texts"]] == expected["ids"]
    assert tokenizer.vocab_size == expected["vocab_size"]
    for token, token_id in expected["special"].items():
        if token_id is not None:
            assert getattr(tokenizer, f"{token}_id") == token_id, token


@pytest.mark.parametrize("name", NAMES + FAMILY)
def test_save_then_load_is_exact(name, tmp_path):
    loaded = load(name)
    tfm.save_pretrained(loaded.model, loaded.params, tmp_path, tokenizer=loaded.tokenizer, generation=loaded.generation)
    again = tfm.from_pretrained(tmp_path)
    assert (again.config, again.head, again.generation) == (loaded.config, loaded.head, loaded.generation)
    jax.tree.map(np.testing.assert_array_equal, again.params, loaded.params)
    texts = json.loads((FIXTURES / name / "tokenizer_reference.json").read_text())["texts"]
    assert [again.tokenizer.encode(t) for t in texts] == [loaded.tokenizer.encode(t) for t in texts]
    assert (again.tokenizer.specials, again.tokenizer.adds_bos) == (loaded.tokenizer.specials, name.startswith("llama"))


def test_a_bert_without_token_types_saves_one_zero_type_as_transformers_needs(tmp_path):
    """transformers' BertModel always adds a token-type embedding (type_vocab_size=0 fails in it):
    the saved checkpoint has one zero row, and computes what the model did."""
    from safetensors.numpy import load_file

    config = tfm.ModelConfig.preset("bert-tiny", type_vocab_size=0, dropout_rate=0.0, attention_dropout_rate=0.0)
    model, tokens = tfm.MaskedLM(config), jnp.arange(2, 10)[None]
    params = model.init(jax.random.PRNGKey(0), tokens)["params"]
    tfm.save_pretrained(model, params, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["type_vocab_size"] == 1
    token_types = load_file(tmp_path / "model.safetensors")["bert.embeddings.token_type_embeddings.weight"]
    np.testing.assert_array_equal(token_types, np.zeros((1, config.d_model)))
    again = tfm.from_pretrained(tmp_path)
    np.testing.assert_allclose(again.model.apply({"params": again.params}, tokens),
                               model.apply({"params": params}, tokens), atol=1e-6)


def test_a_classifier_keeps_its_label_names(tmp_path):
    """Names given to save_pretrained are config.json's id2label and label2id, and come back."""
    clf = load("bert", head="classify", num_labels=3)
    assert clf.label_names == ()  # a new head has no names
    names = ("negative", "positive", "toxic")
    tfm.save_pretrained(clf.model, clf.params, tmp_path, label_names=names)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["id2label"] == {"0": "negative", "1": "positive", "2": "toxic"} and hf["label2id"]["toxic"] == 2
    assert tfm.from_pretrained(tmp_path).label_names == names
    with pytest.raises(ValueError, match="label_names must be 3 distinct names"):
        tfm.save_pretrained(clf.model, clf.params, tmp_path, label_names=("a", "b"))


def test_scanned_and_unscanned_layers_hold_the_same_weights():
    scanned, unscanned = load("t5"), load("t5", scan_layers=False)
    layer = unscanned.params["decoder"]["layers_1"]["cross_attention"]["query"]["kernel"]
    np.testing.assert_array_equal(scanned.params["decoder"]["layers"]["cross_attention"]["query"]["kernel"][1], layer)


def test_a_body_under_a_new_head():
    """BERT pretraining weights under a classifier: the body is the checkpoint's, the head new."""
    classifier = load("bert", head="classify", num_labels=3)
    assert classifier.fresh == ("classifier/bias", "classifier/kernel")
    assert classifier.params["classifier"]["kernel"].shape == (32, 3)
    body = load("bert", head="encoder")
    ref = reference("bert")
    hidden = body.model.apply({"params": body.params}, ref["input_ids"], token_types=ref["token_type_ids"],
                              segment_ids=ref["attention_mask"].astype(np.int32))
    mask = ref["attention_mask"].astype(bool)
    assert np.abs(np.asarray(hidden) - ref["hidden_states"])[mask].max() < 1e-4
    with pytest.raises(ValueError, match="head='lm' does not fit a bert checkpoint"):
        tfm.from_pretrained(FIXTURES / "bert", head="lm")


def test_heads_a_family_has_and_has_not():
    """A family's heads are those transformers has for it: a GPT-2 classifier yes, a GPT-2 MLM no;
    a DistilBERT body has no pooler (a new one is initialised and listed as fresh)."""
    classifier = load("gpt2", head="classify", num_labels=4)
    assert isinstance(classifier.model, tfm.DecoderClassifier) and classifier.fresh == ("classifier/kernel",)
    with pytest.raises(ValueError, match=r"head='mlm' does not fit a gpt2 checkpoint; choose one of \('lm', 'classify'\)"):
        tfm.from_pretrained(FIXTURES / "gpt2", head="mlm")
    body = load("distilbert", head="encoder")
    assert body.fresh == ("pooler/bias", "pooler/kernel")
    qa = load("roberta", head="question_answering")
    assert qa.fresh == ("qa_head/bias", "qa_head/kernel")
    ref = reference("roberta")
    hidden = qa.model.apply({"params": qa.params}, ref["input_ids"], segment_ids=ref["attention_mask"].astype(np.int32),
                            method="encode")
    assert np.abs(np.asarray(hidden) - ref["hidden_states"])[ref["attention_mask"].astype(bool)].max() < 1e-4


def test_a_decoder_classifier_reads_the_last_real_token_on_either_side():
    """GPT2ForSequenceClassification's rule (the rightmost non-padding token): a left-padded row
    gives the logits of the same text right-padded, and of the text alone."""
    loaded, ref = load("gpt2-classify"), reference("gpt2-classify")
    variables, length = {"params": loaded.params}, int(ref["attention_mask"][1].sum())
    text = ref["input_ids"][1, :length]
    pad = np.zeros(3, text.dtype)
    rows = np.stack([np.concatenate([text, pad]), np.concatenate([pad, text])])
    segments = np.stack([np.r_[np.ones(length), pad], np.r_[pad, np.ones(length)]]).astype(np.int32)
    logits = np.asarray(loaded.model.apply(variables, rows, segment_ids=segments))
    alone = np.asarray(loaded.model.apply(variables, text[None]))
    np.testing.assert_allclose(logits, np.repeat(alone, 2, axis=0), atol=1e-5)
    np.testing.assert_allclose(logits[0], ref["logits"][1], atol=1e-4)


def test_roberta_positions_follow_its_padding_id(tmp_path):
    """RoBERTa counts positions from pad_token_id + 1: config.json's pad id is the offset's, and a
    tokenizer with another pad id cannot be saved with the model (transformers would shift every
    position)."""
    loaded = load("roberta")
    assert (loaded.config.position_offset, loaded.config.max_length) == (2, 64)
    tfm.save_pretrained(loaded.model, loaded.params, tmp_path / "saved", tokenizer=loaded.tokenizer)
    hf = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert (hf["pad_token_id"], hf["max_position_embeddings"]) == (1, 66)
    with pytest.raises(UnsupportedCheckpoint, match=r"cannot record pad_token_id=0 \(the model needs 1\)"):
        tfm.save_pretrained(loaded.model, loaded.params, tmp_path / "bad", generation={"pad_id": 0})
    assert not (tmp_path / "bad").exists()
    hf.pop("pad_token_id")  # absent: RobertaConfig's 1
    (tmp_path / "saved" / "config.json").write_text(json.dumps(hf))
    assert checkpoint_config(tmp_path / "saved").position_offset == 2
    _edit_config(tmp_path / "saved", pad_token_id=None)
    with pytest.raises(UnsupportedCheckpoint, match="pad_token_id=None; RoBERTa counts positions from it"):
        checkpoint_config(tmp_path / "saved")


def test_sampler_over_checkpoint_directories(tmp_path):
    """A T5 directory: decoder start from config.json, padded embedding rows never generated."""
    sampler = tfm.Sampler.load(FIXTURES / "t5")
    assert sampler.defaults == {"eos_id": 1, "pad_id": 0, "bos_id": 0, "vocab_size": 154}
    source = [*sampler.tokenizer.encode("Hello world"), 1]  # the source ends with EOS
    expected = tfm.generate(sampler.model, sampler.variables, [source], max_new_tokens=6, bos_id=0, eos_id=1,
                            pad_id=0, vocab_size=154)
    tokens = np.asarray(expected.tokens)[0, : int(np.asarray(expected.lengths)[0])]
    assert sampler("Hello world", max_new_tokens=6) == sampler.tokenizer.decode(tokens)
    llama = tfm.Sampler.load(FIXTURES / "llama")  # starts a prompt with <s>, as transformers' tokenizer does
    prompt_ids = [1, *llama.tokenizer.encode("the river is quiet")]
    new_ids = np.asarray(tfm.generate(llama.model, llama.variables, [prompt_ids], max_new_tokens=5).tokens)[0]
    shown_prompt = llama.tokenizer.decode(prompt_ids)
    assert llama("the river is quiet", max_new_tokens=5) == llama.tokenizer.decode([*prompt_ids, *new_ids])[
        len(shown_prompt):]
    with pytest.raises(ValueError, match="does not generate text"):
        tfm.Sampler.load(FIXTURES / "bert")


def test_generation_never_emits_ids_past_the_vocabulary():
    loaded = load("llama")
    prompt = reference("llama")["greedy_prompt"]
    unrestricted = np.asarray(tfm.generate(loaded.model, {"params": loaded.params}, prompt, max_new_tokens=8).tokens)
    limit = int(unrestricted.max())  # the highest id the model chose is now out of bounds
    output = tfm.generate(loaded.model, {"params": loaded.params}, prompt, max_new_tokens=8, vocab_size=limit)
    assert np.asarray(output.tokens).max() < limit


def test_several_eos_ids_come_from_generation_config_json(tmp_path):
    """As transformers' generate: generation_config.json's ids over config.json's, every EOS id of a
    list (an instruct model's end of turn is often the second), and a Sampler stops at any."""
    llama = _copy("llama", tmp_path)
    assert tfm.from_pretrained(llama).generation == {"eos_id": 2}
    (llama / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "pad_token_id": 0}))
    assert tfm.from_pretrained(llama).generation == {"eos_id": (2, 7), "pad_id": 0}
    assert tfm.Sampler.load(llama)._config(None, {}).eos_ids == (2, 7)
    (llama / "generation_config.json").write_text('{"eos_token_id": [2, 7]')
    with pytest.raises(ValueError, match="generation_config.json is not valid JSON"):
        tfm.from_pretrained(llama)


def test_save_records_the_ids_to_generate_with(tmp_path):
    """generation_config.json's EOS ids survive a save; without a tokenizer the ids come from
    `generation`, and an id nothing knows is written as null, never left to transformers' family
    default (GPT-2's 50256, outside a small vocabulary)."""
    llama = _copy("llama", tmp_path)
    (llama / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "pad_token_id": 0}))
    loaded = tfm.from_pretrained(llama)
    tfm.save_pretrained(loaded.model, loaded.params, tmp_path / "saved", tokenizer=loaded.tokenizer,
                        generation=loaded.generation)
    assert tfm.from_pretrained(tmp_path / "saved").generation == {"eos_id": (2, 7), "pad_id": 0}
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["eos_token_id"] == [2, 7]
    gpt2, keys = load("gpt2"), ("bos_token_id", "eos_token_id", "pad_token_id")
    tfm.save_pretrained(gpt2.model, gpt2.params, tmp_path / "known", generation=gpt2.generation)
    tfm.save_pretrained(gpt2.model, gpt2.params, tmp_path / "unknown")
    for name in ("config.json", "generation_config.json"):
        known, unknown = (json.loads((tmp_path / saved / name).read_text()) for saved in ("known", "unknown"))
        assert {key: known[key] for key in keys} == {"bos_token_id": None, "eos_token_id": 0, "pad_token_id": None}
        assert {key: unknown[key] for key in keys} == dict.fromkeys(keys)


def _copy(name: str, tmp_path: pathlib.Path) -> pathlib.Path:
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return target


def _edit_config(path: pathlib.Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | changes))


def test_bad_checkpoints_are_clear_errors(tmp_path):
    path = _copy("gpt2", tmp_path)
    _edit_config(path, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(UnsupportedCheckpoint, match="scale_attn_by_inverse_layer_idx=True"):
        tfm.from_pretrained(path)
    _edit_config(path, scale_attn_by_inverse_layer_idx=False, model_type="gptj")
    with pytest.raises(UnsupportedCheckpoint, match="model_type='gptj'.*loads bert, roberta, distilbert, albert, gpt2, t5"):
        tfm.from_pretrained(path)
    _edit_config(path, model_type="qwen2")
    with pytest.raises(UnsupportedCheckpoint, match="biases on the query, key and value projections only"):
        tfm.from_pretrained(path)
    _edit_config(path, model_type="gpt2")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(ValueError, match="model.safetensors cannot be read.*truncated or corrupt"):
        tfm.from_pretrained(path)
    weights.rename(path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="never unpickled.*safe_serialization=True"):
        tfm.from_pretrained(path)
    (path / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="has no weights: expected model.safetensors"):
        tfm.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="not a run directory .* nor a Hugging Face checkpoint"):
        tfm.from_pretrained(tmp_path)


def test_unsupported_options_and_unknown_tensors(tmp_path):
    bert = _copy("bert", tmp_path)
    _edit_config(bert, position_embedding_type="relative_key")
    with pytest.raises(UnsupportedCheckpoint, match="position_embedding_type='relative_key'"):
        tfm.from_pretrained(bert)
    llama = _copy("llama", tmp_path)
    _edit_config(llama, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(UnsupportedCheckpoint, match="rope_scaling"):
        tfm.from_pretrained(llama)
    from safetensors.numpy import load_file, save_file

    t5 = _copy("t5", tmp_path)
    tensors = load_file(t5 / "model.safetensors")
    save_file(tensors | {"encoder.block.0.layer.0.SelfAttention.q.bias": np.zeros(32, np.float32)},
              t5 / "model.safetensors")
    with pytest.raises(UnsupportedCheckpoint, match="does not read: encoder.block.0.layer.0.SelfAttention.q.bias"):
        tfm.from_pretrained(t5)
    del tensors["decoder.final_layer_norm.weight"]
    save_file(tensors, t5 / "model.safetensors")
    with pytest.raises(ValueError, match="lacks tensor.*decoder.final_layer_norm.weight"):
        tfm.from_pretrained(t5)


@pytest.mark.parametrize(
    "name, changes, message",
    [
        ("gpt2", {"n_layer": 1000}, "describes 1000 decoder layer(s), but its weights hold the tensors of 2:"),
        ("bert", {"num_hidden_layers": 1}, "describes 1 encoder layer(s), but its weights hold the tensors of 2:"),
        ("t5", {"num_decoder_layers": 3}, "describes 3 decoder layer(s), but its weights hold the tensors of 2:"),
        ("llama", {"vocab_size": 1_000_000}, "a vocabulary of 1000000 and a width of 32 (embedding [1000000, 32]), "
                                             "but its weights' model.embed_tokens.weight is [210, 32]"),
        ("gpt2", {"n_embd": 64}, "a vocabulary of 300 and a width of 64 (embedding [300, 64]), but its "
                                 "weights' transformer.wte.weight is [300, 32]"),
        ("gpt2", {"n_layer": 100_000}, "num_decoder_layers=100000 is out of range: it must be in [0, 4096]"),
        ("llama", {"vocab_size": 2_000_000_000}, "ModelConfig.vocab_size=2000000000 is out of range"),
    ],
)
def test_a_config_json_that_is_not_its_weights_is_refused_before_anything_is_read(
    name, changes, message, tmp_path, monkeypatch,
):
    """config.json's layer counts, vocabulary and width are compared with the tensor names and
    shapes of the files' headers before a tensor is read or a layer traced (100,000 layers over
    2 layers' tensors took minutes and gigabytes to be refused)."""
    from transformer import pretrained

    def never(*args):
        raise AssertionError("tensors were read")

    path = _copy(name, tmp_path)
    _edit_config(path, **changes)
    monkeypatch.setattr(pretrained, "_read_tensors", never)
    with pytest.raises(ValueError, match=re.escape(message)):
        tfm.from_pretrained(path)
    with pytest.raises(ValueError, match=re.escape(message)):
        checkpoint_config(path)  # what a fine-tuning run reads first


def test_a_tensor_of_the_wrong_shape_is_refused_even_with_the_right_size(tmp_path):
    """A transposed [in, out] weight holds as many numbers as the [out, in] one; read as it is,
    the model would compute nonsense (transformers refuses it too)."""
    from safetensors.numpy import load_file, save_file

    bert = _copy("bert", tmp_path)
    tensors = load_file(bert / "model.safetensors")
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    save_file(tensors | {name: np.ascontiguousarray(tensors[name].T)}, bert / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{name} has shape \(32, 64\); .* needs \(64, 32\)"):
        tfm.from_pretrained(bert)


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path):
    path = _copy("gpt2", tmp_path)
    _edit_config(path, vocab_size=200)
    tensors_path = path / "model.safetensors"
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tensors_path)
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:200]
    save_file(tensors, tensors_path)
    with pytest.raises(ValueError, match="300 pieces but the model's vocab_size is 200"):
        tfm.from_pretrained(path)


def test_models_the_hugging_face_layout_cannot_express():
    config = tfm.ModelConfig.preset("transformer-tiny")  # sinusoidal, post-norm encoder-decoder
    with pytest.raises(UnsupportedCheckpoint, match="T5 checkpoint cannot express position='sinusoidal'"):
        tfm.save_pretrained(tfm.Seq2SeqLM(config), {}, "unused")
    unscaled = tfm.ModelConfig.preset("gpt2-tiny", attention_logit_scaling=False)  # transformers would scale
    with pytest.raises(UnsupportedCheckpoint, match="GPT-2 checkpoint cannot express attention_logit_scaling=False"):
        tfm.save_pretrained(tfm.CausalLM(unscaled), {}, "unused")
    with pytest.raises(ValueError, match="encoder-decoder model needs its tokenizer"):
        tfm.save_pretrained(load("t5").model, load("t5").params, "unused")


def test_checkpoint_variants_real_files_have(tmp_path):
    """bfloat16 weights, TensorFlow-era norm names, T5's unused cross-attention bias, a BERT MLM without
    a pooler, Mistral's sliding window: each loads as transformers loads it."""
    from safetensors.flax import save_file as save_flax
    from safetensors.numpy import load_file, save_file

    bert = _copy("bert", tmp_path)
    tensors = load_file(bert / "model.safetensors")
    renamed = {name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): value
               for name, value in tensors.items()}
    save_flax({name: jax.numpy.asarray(value, "bfloat16") for name, value in renamed.items()}, bert / "model.safetensors")
    loaded = tfm.from_pretrained(bert, head="mlm")
    rounded = np.asarray(jax.numpy.asarray(tensors["bert.embeddings.LayerNorm.weight"], "bfloat16"), np.float32)
    np.testing.assert_array_equal(loaded.params["embed"]["norm"]["scale"], rounded)
    tfm.save_pretrained(loaded.model, loaded.params, tmp_path / "mlm", tokenizer=loaded.tokenizer)  # no pooler
    assert "bert.pooler.dense.weight" not in load_file(tmp_path / "mlm" / "model.safetensors")

    t5 = _copy("t5", tmp_path)
    tensors = load_file(t5 / "model.safetensors")
    unused = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
    save_file(tensors | {unused: np.ones((32, 4), np.float32)}, t5 / "model.safetensors")
    jax.tree.map(np.testing.assert_array_equal, tfm.from_pretrained(t5).params, load("t5").params)
    _edit_config(t5, dense_act_fn="gelu_new")
    with pytest.raises(UnsupportedCheckpoint, match="dense_act_fn='gelu_new'"):
        tfm.from_pretrained(t5)

    mistral = _copy("llama", tmp_path)
    _edit_config(mistral, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=16)
    assert tfm.from_pretrained(mistral).config.max_length == 16  # exact within the window
    _edit_config(mistral, sliding_window=None, max_position_embeddings=8192)
    assert checkpoint_config(mistral).max_length == 8192  # null: no window
    config = json.loads((mistral / "config.json").read_text())
    del config["sliding_window"]
    (mistral / "config.json").write_text(json.dumps(config))
    assert checkpoint_config(mistral).max_length == 4096  # absent: MistralConfig's window
    _edit_config(mistral, sliding_window=16)
    with pytest.raises(UnsupportedCheckpoint, match="exceeds the checkpoint's sliding_window=16"):
        tfm.from_pretrained(mistral, max_length=64)
    _edit_config(mistral, architectures=["MistralForTokenClassification"])
    with pytest.raises(UnsupportedCheckpoint, match="MistralForTokenClassification.*not supported"):
        tfm.from_pretrained(mistral)


def test_a_mistral_model_is_saved_as_mistral(tmp_path):
    """Its window is kept (saved as Llama, transformers would attend past it to everything), and it
    loads back as the same config."""
    mistral = _copy("llama", tmp_path)
    _edit_config(mistral, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=16)
    loaded = tfm.from_pretrained(mistral)
    assert (loaded.config.max_length, loaded.config.sliding_window) == (16, 16)
    tfm.save_pretrained(loaded.model, loaded.params, tmp_path / "saved", tokenizer=loaded.tokenizer)
    hf = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert (hf["model_type"], hf["architectures"], hf["sliding_window"]) == ("mistral", ["MistralForCausalLM"], 16)
    assert tfm.from_pretrained(tmp_path / "saved").config == loaded.config
    with pytest.raises(ValueError, match="max_length=32 exceeds sliding_window=16"):
        loaded.config.replace(max_length=32)


def test_sharded_checkpoints_load_like_one_file(tmp_path):
    from safetensors.numpy import load_file, save_file

    path = _copy("llama", tmp_path)
    tensors = load_file(path / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        save_file({name: tensors[name] for name in shard_names}, path / shard)
    weight_map = {name: shard for shard, shard_names in shards.items() for name in shard_names}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "model.safetensors").unlink()
    jax.tree.map(np.testing.assert_array_equal, tfm.from_pretrained(path).params, load("llama").params)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lists model-00002-of-00002.safetensors, which is missing"):
        tfm.from_pretrained(path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="has no weight_map"):
        tfm.from_pretrained(path)


def test_an_index_naming_shards_outside_its_directory_is_refused(tmp_path):
    """A shard is a file in the checkpoint's directory: `../other/model.safetensors` or an absolute
    path is never opened."""
    from safetensors.numpy import load_file

    llama = _copy("llama", tmp_path)
    (tmp_path / "other").mkdir()
    (llama / "model.safetensors").rename(tmp_path / "other" / "model.safetensors")
    names = list(load_file(tmp_path / "other" / "model.safetensors"))
    for outside in ("../other/model.safetensors", str(tmp_path / "other" / "model.safetensors")):
        (llama / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, outside)}))
        with pytest.raises(ValueError, match=f"lists the shard '{re.escape(outside)}', which is not a file in"):
            tfm.from_pretrained(llama)


def test_weights_that_are_not_finite_floats_are_refused(tmp_path):
    """An integer tensor is not cast to float unseen, and a NaN or inf is not loaded (a sampler
    would print nothing): each is an error naming the tensor. An integer buffer no rule reads
    (old BERT files' position_ids) still loads."""
    from safetensors.numpy import load_file, save_file

    llama = _copy("llama", tmp_path)
    tensors, name = load_file(llama / "model.safetensors"), "model.norm.weight"
    save_file(tensors | {name: tensors[name].astype(np.int64)}, llama / "model.safetensors")
    with pytest.raises(UnsupportedCheckpoint, match=f"safetensors: {name} holds I64 values, but weights are float"):
        tfm.from_pretrained(llama)
    for bad in (np.nan, -np.inf):
        broken = np.where(np.arange(32) == 3, bad, tensors[name]).astype(np.float32)
        save_file(tensors | {name: broken}, llama / "model.safetensors")
        with pytest.raises(ValueError, match=f"model.safetensors: {name} has NaN or infinite values"):
            tfm.from_pretrained(llama)
    save_file(tensors | {name: np.full(32, 1e5, np.float32)}, llama / "model.safetensors")
    with pytest.raises(ValueError, match=f"{name} has values outside float16's range; load it with dtype='float32'"):
        tfm.from_pretrained(llama, dtype="float16")
    bert = _copy("bert", tmp_path)
    tensors = load_file(bert / "model.safetensors")
    positions = {"bert.embeddings.position_ids": np.arange(64, dtype=np.int64)[None]}
    save_file(tensors | positions, bert / "model.safetensors")
    jax.tree.map(np.testing.assert_array_equal, tfm.from_pretrained(bert).params, load("bert").params)


def test_a_hub_id_opens_from_the_hub_cache(tmp_path, monkeypatch):
    """"org/name" is read from huggingface_hub's cache (blobs, a snapshot of links to them,
    refs/main), without the network; an id not cached fails at once, naming it."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo, commit = tmp_path / "models--org--tiny-gpt2", "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    for directory in (repo / "blobs", repo / "refs", snapshot):
        directory.mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for file in (FIXTURES / "gpt2").iterdir():
        blob = repo / "blobs" / sha256_file(file)
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    assert huggingface_hub.try_to_load_from_cache("org/tiny-gpt2", "config.json") == str(snapshot / "config.json")
    loaded = tfm.from_pretrained("org/tiny-gpt2")
    jax.tree.map(np.testing.assert_array_equal, loaded.params, load("gpt2").params)
    assert loaded.tokenizer.path == snapshot / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="Hugging Face Hub model org/missing is not in the hub's cache"):
        tfm.from_pretrained("org/missing")


def test_a_mistyped_local_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """runs/gpt-qick looks like a Hub id (org/name), but runs/ is a folder here: it is a missing
    local directory, said at once, not a download attempted from the network."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(pretrained_module, "_hub_snapshot", lambda repo_id: pytest.fail(f"looked up {repo_id} on the Hub"))
    with pytest.raises(FileNotFoundError, match="runs/gpt-qick is not a directory"):
        tfm.from_pretrained("runs/gpt-qick")


def test_a_named_checkpoint_opens_by_its_name(tmp_path, monkeypatch):
    """The names init_from= takes (all-minilm-l6-v2) open here too, from the extraction in the cache."""
    monkeypatch.setenv("TRANSFORMER_CACHE", str(tmp_path))
    extracted = tmp_path / "pretrained" / "all-minilm-l6-v2.v1"
    shutil.copytree(FIXTURES / "bert-body", extracted)  # standing in for the real checkpoint
    (extracted / DIGESTS).write_text(json.dumps(file_digests(extracted, DIGESTS)))
    jax.tree.map(np.testing.assert_array_equal, tfm.from_pretrained("all-minilm-l6-v2").params,
                 load("bert-body").params)


def test_a_pretrained_model_prints_its_architecture_not_its_weights():
    assert repr(load("llama")) == (
        "Pretrained(CausalLM, head='lm', 2 decoder layers, d_model=32, 4 heads (2 key/value), d_ff=64, "
        "vocab_size=210, max_length=64, 32,032 parameters, "
        f"tokenizer=HuggingFaceTokenizer({FIXTURES / 'llama' / 'tokenizer.json'}, vocab_size=210))"
    )


# all-MiniLM-L6-v2 through transformers 4.57.6 (BertModel, mean pooling over the attention mask, L2
# normalisation, as sentence-transformers does), once, on these sentences: the first four dimensions of
# each embedding and the cosine similarity of each pair.
MINILM_SENTENCES = ["A man is playing a guitar.", "Someone plays an acoustic guitar.",
                    "The stock market fell sharply today.", "A chef is cooking pasta in the kitchen.",
                    "Pasta is being prepared by a cook."]
MINILM_EMBEDDINGS = [[0.021664, -0.004864, -0.009649, -0.063401], [0.023163, 0.000715, 0.027428, -0.025650],
                     [0.060455, 0.005445, 0.076566, 0.053829], [-0.021271, -0.036635, -0.046889, 0.089861],
                     [-0.038388, -0.032416, -0.049606, 0.108548]]
MINILM_SIMILARITY = [[1.0, 0.801948, -0.054027, 0.150034, 0.034563], [0.801948, 1.0, -0.007439, 0.117111, 0.06005],
                     [-0.054027, -0.007439, 1.0, -0.030842, -0.005181], [0.150034, 0.117111, -0.030842, 1.0, 0.777301],
                     [0.034563, 0.06005, -0.005181, 0.777301, 1.0]]


@pytest.mark.network
def test_real_minilm_sentence_embeddings():
    minilm = tfm.from_pretrained("all-minilm-l6-v2")
    embeddings = minilm.embed(MINILM_SENTENCES)
    np.testing.assert_allclose(embeddings[:, :4], MINILM_EMBEDDINGS, atol=2e-6)
    similarity = embeddings @ embeddings.T
    np.testing.assert_allclose(similarity, MINILM_SIMILARITY, atol=2e-6)
    for sentence, paraphrase in ((0, 1), (3, 4)):  # each paraphrase is nearer than every unrelated sentence
        others = [i for i in range(len(MINILM_SENTENCES)) if i not in (sentence, paraphrase)]
        assert similarity[sentence, paraphrase] > similarity[sentence, others].max()


def test_sampling_command_line_over_a_checkpoint_directory():
    command = [sys.executable, "-m", "transformer.sample", str(FIXTURES / "t5"), "--prompt", "Hello world",
               "--strategy", "greedy", "--max-new-tokens", "6"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = tfm.Sampler.load(FIXTURES / "t5")("Hello world", max_new_tokens=6)
    assert result.stdout.splitlines()[-1] == f"-> {expected}"
