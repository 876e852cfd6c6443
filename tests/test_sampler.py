"""Sampler over a run directory: batches, streaming, the command line and clear errors."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

import synthetic
from processes import subprocess_env
from train import config as config_lib
from train import loop
from transformer.decoding import GenerationConfig
from transformer.sampler import Sampler

TINY = ["model.vocab_size=256", "model.d_model=32", "model.num_heads=2", "model.d_ff=64", "model.max_length=64"]
SHORT = ["steps=30", "batch_size=8", "seq_length=32", "source_length=32", "learning_rate=3e-3", "warmup_steps=2",
         "log_every=10", "eval_every=1000", "eval_batches=1", "sample_tokens=4", "bleu_examples=2"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("lm")
    (folder / "train.txt").write_text("\n".join(synthetic.sentences(600, 0)))
    config = config_lib.parse_args([
        "model=gpt2-tiny", *TINY, "model.num_decoder_layers=1", f"train_files=[{folder / 'train.txt'}]",
        "file_format=lines", *SHORT, f"run_dir={folder / 'run'}",
    ])
    loop.run(config, progress=False)
    return folder / "run"


@pytest.fixture(scope="module")
def translation_run(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("translation")
    pairs = [(s, " ".join(reversed(s.split()))) for s in synthetic.sentences(400, 2)]
    (folder / "train.tsv").write_text("\n".join(f"{a}\t{b}" for a, b in pairs))
    config = config_lib.parse_args([
        "transformer-tiny-en-fr", *TINY, "model.num_encoder_layers=1", "model.num_decoder_layers=1",
        f"train_files=[{folder / 'train.tsv'}]", "file_format=tsv", *SHORT, f"run_dir={folder / 'run'}",
    ])
    loop.run(config, progress=False)
    return folder / "run"


def test_a_batch_of_texts_equals_each_text_alone(lm_run):
    sampler = Sampler.load(lm_run)
    texts = ["Ka", "Torimu sen lo va tal ber", "Quin dor ash"]
    batch = sampler(texts, max_new_tokens=12)
    assert batch == [sampler(text, max_new_tokens=12) for text in texts]
    assert all(isinstance(t, str) and t for t in batch)


@pytest.mark.parametrize("options", [dict(strategy="greedy"), dict(strategy="sample", top_k=20, temperature=1.5, seed=3)])
def test_stream_joins_to_the_full_result(lm_run, options):
    sampler = Sampler.load(lm_run)
    pieces = list(sampler.stream("Ka to", max_new_tokens=16, **options))
    assert len(pieces) > 1  # it really streamed
    assert "".join(pieces) == sampler("Ka to", max_new_tokens=16, **options)


def test_same_seed_same_text_and_seeds_differ(lm_run):
    sampler = Sampler.load(lm_run)
    options = dict(max_new_tokens=16, strategy="sample", temperature=2.0)
    assert sampler("Ka", seed=1, **options) == sampler("Ka", seed=1, **options)
    assert len({sampler("Ka", seed=s, **options) for s in range(4)}) > 1


def test_translation_run_translates_batches_and_beams(translation_run):
    sampler = Sampler.load(translation_run)
    sources = ["Ka to ri", "Mu sen lo va tal"]
    greedy = sampler(sources, max_new_tokens=10)
    assert greedy == [sampler(s, max_new_tokens=10) for s in sources]
    # One beam without length normalisation is greedy (with it, beams may prefer longer outputs).
    assert sampler(sources[0], max_new_tokens=10, strategy="beam", num_beams=1, length_penalty=0.0) == greedy[0]
    assert "".join(sampler.stream(sources[1], max_new_tokens=10)) == greedy[1]


def test_a_config_and_options_by_name_give_the_same_text(lm_run):
    sampler = Sampler.load(lm_run)
    config = GenerationConfig(max_new_tokens=8, strategy="sample", top_k=20)
    text = sampler("Ka", config, seed=2)
    assert text == sampler("Ka", seed=2, max_new_tokens=8, strategy="sample", top_k=20)
    assert "".join(sampler.stream("Ka", config, seed=2)) == text
    assert sampler("Ka", config, seed=2, strategy="greedy") == sampler("Ka", max_new_tokens=8)
    with pytest.raises(TypeError, match="Unknown generation option beams"):
        sampler("Ka", beams=2)


def test_command_line_prints_prompt_and_continuation(lm_run):
    sampler = Sampler.load(lm_run)
    expected = "Ka to" + sampler("Ka to", max_new_tokens=6)
    env = subprocess_env()
    result = subprocess.run(
        [sys.executable, "-m", "transformer.sample", str(lm_run), "--prompt", "Ka to", "--strategy", "greedy",
         "--max-new-tokens", "6"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == expected
    assert "Warning" not in result.stderr, result.stderr  # e.g. runpy's "found in sys.modules"
    missing = subprocess.run([sys.executable, "-m", "transformer.sample", str(lm_run.parent / "nothing")],
                             env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and "is not a run directory" in missing.stderr


def test_bad_input_is_a_clear_error(lm_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        Sampler.load(tmp_path)
    (tmp_path / "config.yaml").write_text("task: classification\nmodel: {}\n")
    with pytest.raises(ValueError, match="trained a classification model, which does not generate text"):
        Sampler.load(tmp_path)
    sampler = Sampler.load(lm_run)
    with pytest.raises(ValueError, match="exceeds the model's context of 64 tokens"):
        sampler("Ka " * 100, max_new_tokens=8)
    with pytest.raises(ValueError, match="Streaming .* needs strategy 'greedy' or 'sample'"):
        list(sampler.stream("Ka", strategy="beam", max_new_tokens=8))
    with pytest.raises(FileNotFoundError, match="No checkpoint for step 7"):
        Sampler.load(lm_run, step=7)
    assert np.isfinite(np.asarray(sampler.variables["params"]["embed"]["token"]["embedding"])).all()


def test_prompt_of_the_wrong_type_is_a_type_error(lm_run):
    """A prompt that is not a str (or a list or tuple of str) is refused before anything is compiled."""
    sampler = Sampler.load(lm_run)
    for prompt in (123, None, b"Ka", ["Ka", 5], iter(["Ka"])):
        kind = type(prompt).__name__
        with pytest.raises(TypeError, match=f"^The prompt must be a str or a list of str, got {kind} "):
            sampler(prompt)
        with pytest.raises(TypeError, match=f"^The prompt must be a str, got {kind} "):
            list(sampler.stream(prompt))
    with pytest.raises(TypeError) as error:
        sampler(123)
    assert str(error.value) == "The prompt must be a str or a list of str, got int 123."
    assert sampler(("Ka", "Ka to"), max_new_tokens=2) == sampler(["Ka", "Ka to"], max_new_tokens=2)
