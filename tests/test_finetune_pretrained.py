"""Fine-tuning from a Hugging Face checkpoint (`init_from=DIR` or a named one): the body starts
from the checkpoint's parameters, the run directory keeps the checkpoint's tokenizer and reopens
with `load_run`; a checkpoint that does not fit the task, or an unknown name, is a clear error."""

import json
import pathlib
import shutil

import numpy as np
import pytest
from flax import traverse_util
from processes import ROOT

import flax.linen as nn
from train import config as config_lib
from train import loop
from transformer.models import DecoderClassifier
from transformer.pretrained import from_pretrained, pretrained_checkpoint
from transformer.runs import load_run
from transformer.tokenizer import Tokenizer

FIXTURES = ROOT / "tests" / "fixtures" / "pretrained"
# Words of the bert-body fixture's vocabulary: a sentence's label is which group it draws from.
WORDS = (("dog", "barked", "fast", "children", "came"), ("birds", "fish", "clouds", "dark", "evening"))
TEXTS = ["The dog barked, fast!", "Few birds ate fish; clouds came.", "Hello, café 9?"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    """The tiny random BertModel, copied (a run must not depend on the fixture's location)."""
    return pathlib.Path(shutil.copytree(FIXTURES / "bert-body", tmp_path_factory.mktemp("hf") / "bert-body"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, pathlib.Path]:
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    paths = {}
    for split, count in (("train", 64), ("validation", 16)):
        labels = rng.integers(0, 2, count)
        lines = [json.dumps({"text": " ".join(rng.choice(WORDS[label], 5)), "label": int(label)}) for label in labels]
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("\n".join(lines) + "\n")
    return paths


def fine_tune_args(checkpoint, data, run_dir, *extra) -> list[str]:
    return [
        "bert-tiny-sentiment", f"init_from={checkpoint}", f"train_files=[{data['train']}]",
        f"validation_files=[{data['validation']}]", "file_format=jsonl", "seq_length=16", "batch_size=8",
        "steps=4", "warmup_steps=1", "log_every=2", "eval_every=4", "eval_batches=1", "checkpoint_every=4",
        "model.dropout_rate=0.0", f"run_dir={run_dir}", *extra,
    ]


def flat(params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(nn.meta.unbox(params), sep="/").items()}


def test_the_body_starts_from_the_checkpoint(checkpoint, data, tmp_path):
    """The architecture is the checkpoint's (this run's dropout kept); at step 0 every body
    parameter equals the checkpoint's, and only the classifier is new."""
    config = loop.resolve_init_from(config_lib.parse_args(fine_tune_args(checkpoint, data, tmp_path / "run")))
    assert (config.model.d_model, config.model.num_encoder_layers, config.model.vocab_size) == (32, 2, 200)
    assert config.model.dropout_rate == 0.0 and config.model.attention_dropout_rate == 0.1
    config.run_path.mkdir(parents=True)
    job = loop.set_up(config, config.run_path, resuming=False)
    started = flat(loop.load_pretrained(job, say=lambda *_: None).params)
    body = flat(from_pretrained(checkpoint, head="encoder", scan_layers=config.model.scan_layers).params)
    assert set(started) - set(body) == {"classifier/kernel", "classifier/bias"}
    for name, value in body.items():
        np.testing.assert_array_equal(started[name], value, err_msg=name)


def test_the_run_keeps_the_checkpoint_tokenizer_and_reopens(checkpoint, data, tmp_path):
    """The run directory holds the checkpoint's tokenizer (recorded with its origin), reopens with
    load_run, and resumes with the same tokenizer files, the checkpoint gone by then; a start
    refused for data changed in place leaves the run's labels as they were."""
    checkpoint = pathlib.Path(shutil.copytree(checkpoint, tmp_path / "checkpoint"))
    data = dict(data, train=pathlib.Path(shutil.copyfile(data["train"], tmp_path / "train.jsonl")))
    run_dir = tmp_path / "run"
    result = loop.run(config_lib.parse_args(fine_tune_args(checkpoint, data, run_dir)), progress=False)
    assert result.step == 4 and "accuracy" in result.validation
    expected = Tokenizer.load(checkpoint)
    run = load_run(run_dir)
    assert run.step == 4 and run.model.config.d_model == 32
    assert from_pretrained(run_dir).label_names == ("0", "1")
    assert run.tokenizer.encode_batch(TEXTS) == expected.encode_batch(TEXTS)
    for kind in ("pad_id", "cls_id", "sep_id", "mask_id", "unk_id"):
        assert getattr(run.tokenizer, kind) == getattr(expected, kind), kind
    records = json.loads((run_dir / "artefacts.json").read_text())
    tokenizer_records = [records[name] for name in records if name.startswith("tokenizer")]
    assert tokenizer_records and all(r["copied_from"] == str(checkpoint) and r["files"] for r in tokenizer_records)
    assert not (run_dir / "tokenizer.model").exists()
    saved = {p.name: p.read_bytes() for p in run_dir.glob("tokenizer*")}
    shutil.rmtree(checkpoint)
    resumed = loop.run(config_lib.parse_args(fine_tune_args(checkpoint, data, run_dir, "steps=6")), progress=False)
    assert resumed.step == 6 and {p.name: p.read_bytes() for p in run_dir.glob("tokenizer*")} == saved
    rows = [json.loads(line) for line in data["train"].read_text().splitlines()]
    data["train"].write_text("\n".join(json.dumps(row | {"label": ("zzz", "aaa")[row["label"]]}) for row in rows))
    with pytest.raises(ValueError, match="made from something else"):
        loop.run(config_lib.parse_args(fine_tune_args(checkpoint, data, run_dir, "steps=8")), progress=False)
    assert from_pretrained(run_dir).label_names == ("0", "1")


def test_a_gpt2_checkpoint_fine_tunes_as_a_decoder_classifier(tmp_path, data):
    """A decoder-only checkpoint classifies as GPT does: its LM's body under a classifier on the
    last real token (`DecoderClassifier`, no bias), the text fed with EOS after it (GPT-2's
    vocabulary has no [CLS] or [SEP]); at step 0 every body parameter is the checkpoint's."""
    config = loop.resolve_init_from(config_lib.parse_args(fine_tune_args(FIXTURES / "gpt2", data, tmp_path / "run")))
    config.run_path.mkdir(parents=True)
    job = loop.set_up(config, config.run_path, resuming=False)
    assert isinstance(job.model, DecoderClassifier)
    started = flat(loop.load_pretrained(job, say=lambda *_: None).params)
    body = flat(from_pretrained(FIXTURES / "gpt2", head="lm", scan_layers=config.model.scan_layers).params)
    assert set(started) - set(body) == {"classifier/kernel"}
    for name in set(started) & set(body):
        np.testing.assert_array_equal(started[name], body[name], err_msg=name)
    batch = next(job.batches)
    last = batch["segment_ids"].sum(axis=1) - 1  # right-padded rows: the last real token
    assert (batch["tokens"][np.arange(len(last)), last] == job.tokenizer.eos_id).all()


def test_an_encoder_decoder_checkpoint_for_classification_is_a_clear_error(tmp_path, data):
    config = config_lib.parse_args(fine_tune_args(FIXTURES / "t5", data, tmp_path / "run"))
    with pytest.raises(ValueError, match="t5 is a Hugging Face checkpoint with an encoder and a decoder, but "
                       "task=classification needs an encoder only .* or a decoder only"):
        loop.run(config, progress=False)
    assert not (tmp_path / "run").exists()


def test_an_unknown_named_checkpoint_is_a_clear_error(tmp_path, data):
    config = config_lib.parse_args(fine_tune_args("no-such-model", data, tmp_path / "run"))
    with pytest.raises(ValueError, match="'no-such-model' is neither a directory nor a named checkpoint.*all-minilm-l6-v2"):
        loop.run(config, progress=False)
    with pytest.raises(ValueError, match="Unknown pretrained checkpoint 'no-such-model'; available: all-minilm-l6-v2"):
        pretrained_checkpoint("no-such-model")


@pytest.mark.network
def test_a_damaged_extracted_checkpoint_is_extracted_again(tmp_path, monkeypatch, capsys):
    """A flipped byte in the extracted weights is caught by the digests written at extraction."""
    downloads = pretrained_checkpoint("all-minilm-l6-v2").parents[1] / "downloads"  # fetched once
    monkeypatch.setenv("TRANSFORMER_CACHE", str(tmp_path))
    (tmp_path / "downloads").symlink_to(downloads)
    weights = pretrained_checkpoint("all-minilm-l6-v2") / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert (pretrained_checkpoint("all-minilm-l6-v2") / "model.safetensors").read_bytes() == original
    assert "does not match its digests" in capsys.readouterr().err


@pytest.mark.network
def test_all_minilm_l6_v2_is_fetched_and_loads_as_a_bert_body():
    """The named checkpoint of `minilm-sentiment`: fetched once, a BERT body whose shape the
    experiment declares, with BERT's uncased WordPiece tokenizer."""
    path = pretrained_checkpoint("all-minilm-l6-v2")
    assert pretrained_checkpoint("all-minilm-l6-v2") == path  # cached
    body = from_pretrained(path, head="encoder")
    config = body.model.config
    assert (config.d_model, config.num_encoder_layers, config.num_heads, config.vocab_size, config.max_length) == (
        384, 6, 12, 30522, 512
    )
    declared = config_lib.experiment("minilm-sentiment").model
    resolved = loop.resolve_init_from(config_lib.experiment("minilm-sentiment")).model
    shape = ("d_model", "num_heads", "d_ff", "num_encoder_layers", "vocab_size", "max_length", "type_vocab_size")
    assert [getattr(resolved, f) for f in shape] == [getattr(declared, f) for f in shape] == [getattr(config, f) for f in shape]
    tokenizer = body.tokenizer
    assert tokenizer.encode("Hello world") == [7592, 2088]
    assert (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.mask_id) == (101, 102, 0, 103)


def test_a_checkpoint_tokenizer_model_keeps_its_configs(tmp_path):
    """A Llama-style checkpoint's tokenizer.model is opened with the files beside it (its
    tokenizer_config.json says whether texts start with <s>), not copied alone as a run's is."""
    from train import tasks

    checkpoint = shutil.copytree(FIXTURES / "t5", tmp_path / "llama-like")
    (checkpoint / "spiece.model").rename(checkpoint / "tokenizer.model")
    config = config_lib.parse_args(["init_from=" + str(checkpoint)])
    assert tasks._tokenizer_source(config) == checkpoint


def test_a_t5_checkpoint_fine_tunes_on_translation_and_decodes_as_it_did(tmp_path):
    """T5's tokenizer has no BOS: teacher forcing starts the decoder at the pad id, as the
    checkpoint's decoder_start_token_id does, and the run (learning rate 1e-12) translates exactly as
    the checkpoint itself."""
    from train import data as data_lib
    from transformer.sampler import Sampler

    checkpoint = shutil.copytree(FIXTURES / "t5", tmp_path / "t5")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"source": s, "target": s[::-1]}) + "\n" for s in TEXTS * 4))
    args = [
        "transformer-tiny-en-fr", f"init_from={checkpoint}", f"train_files=[{pairs}]", f"validation_files=[{pairs}]",
        "file_format=jsonl", "seq_length=8", "source_length=8", "batch_size=4", "steps=2", "learning_rate=1e-12",
        "log_every=2", "eval_every=2", "eval_batches=1", "bleu_examples=2", "bleu_beams=0",
        f"run_dir={tmp_path / 'run'}",
    ]
    result = loop.run(config_lib.parse_args(args), progress=False)
    assert result.step == 2 and "bleu" in result.validation
    start = json.loads((checkpoint / "config.json").read_text())["decoder_start_token_id"]
    features = data_lib.seq2seq_features({"source": "a", "target": "b"}, Tokenizer.load(checkpoint), 8, 8)
    assert features["target_in"][0] == start
    run, original = Sampler.load(tmp_path / "run"), Sampler.load(checkpoint)
    assert run.defaults["bos_id"] == start
    assert run(TEXTS, max_new_tokens=6) == original(TEXTS, max_new_tokens=6)
