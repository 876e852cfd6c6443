"""Sampler over a run directory: batches, streaming, the command line and clear errors."""

import dataclasses
import io
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, pre_tokenizers

import synthetic
import transformer as tfm
from processes import subprocess_env
from train import config as config_lib
from train import loop, tasks
from transformer import show_attention
from transformer.decoding import GenerationConfig, unscanned
from transformer.interpret import text_attention
from transformer.runs import load_run
from transformer.sample import main as sample_command
from transformer.sampler import INCOMPLETE, Sampler
from transformer.tokenizer import HuggingFaceTokenizer, SpecialTokens

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
        f"train_files=[{folder / 'train.tsv'}]", "file_format=tsv", *SHORT, "steps=400", f"run_dir={folder / 'run'}",
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


def test_a_stream_stops_at_any_of_several_eos_ids(lm_run):
    sampler = Sampler.load(lm_run)
    options = dict(max_new_tokens=16, strategy="sample", temperature=1.0, seed=1)
    prompt, new = sampler.token_ids("Ka to", **options)
    stop = next(i for i in range(2, len(new)) if new[i] not in new[:i])  # a token that first appears at i
    options["eos_id"] = (sampler.tokenizer.eos_id, new[stop])
    pieces = list(sampler.stream("Ka to", **options))
    assert "".join(pieces) == sampler._text(prompt, new[:stop]) == sampler("Ka to", **options)


def test_a_stream_of_byte_tokens_joins_to_the_full_result_across_split_characters():
    """A byte-level tokenizer (GPT-2's kind) cuts characters of several bytes across tokens: the
    stream holds such a character back until its last byte, and goes on after it."""
    vocab = {byte: i for i, byte in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # 256 bytes, no merges
    byte_level = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab | {"<|endoftext|>": 256}, merges=[]))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    byte_level.add_special_tokens(["<|endoftext|>"])
    cfg = tfm.ModelConfig.preset("gpt2-tiny", vocab_size=257, max_length=32, num_decoder_layers=1)
    model = tfm.CausalLM(cfg)
    sampler = Sampler(model, model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"],
                      HuggingFaceTokenizer(byte_level, SpecialTokens(eos=256, pad=256, bos=256)))
    texts = []
    for seed in range(4):
        options = dict(max_new_tokens=16, strategy="sample", temperature=1.0, seed=seed)
        texts.append(sampler("Hi", **options))
        assert "".join(sampler.stream("Hi", **options)) == texts[-1]
    # whole characters of several bytes were made (U+FFFD stands for bytes that never made one)
    assert any(len(character.encode()) > 1 and character != INCOMPLETE for text in texts for character in text)


def test_token_ids_are_the_ids_of_the_text_a_call_returns(lm_run):
    sampler = Sampler.load(lm_run)
    options = dict(max_new_tokens=12, strategy="sample", temperature=1.5, seed=2)
    prompt, new = sampler.token_ids("Ka to", **options)
    assert prompt == sampler.tokenizer.encode("Ka to") and len(new) == 12
    assert sampler.tokenizer.decode(prompt + new) == "Ka to" + sampler("Ka to", **options)


def test_a_seed_fixes_each_texts_sample_by_its_place_in_the_batch(lm_run):
    """The same seed gives the same texts, call after call; a text's continuation depends on the
    seed and its place, not on the other texts (the middle one changed, the others keep theirs),
    so the same text in two places gets two samples; another seed, other texts."""
    sampler = Sampler.load(lm_run)
    options = dict(max_new_tokens=16, strategy="sample", temperature=2.0)
    texts = sampler(["Ka", "Mu sen", "Ka"], seed=1, **options)
    assert sampler(["Ka", "Mu sen", "Ka"], seed=1, **options) == texts
    assert sampler(["Ka", "Quin dor ash", "Ka"], seed=1, **options)[::2] == texts[::2]
    assert texts[0] != texts[2]
    assert all(a != b for a, b in zip(sampler(["Ka", "Mu sen", "Ka"], seed=2, **options), texts))


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
    assert sampler("Ka", config, seed=2, strategy="greedy", top_k=None) == sampler("Ka", max_new_tokens=8)
    with pytest.raises(ValueError, match="top_k=20 applies to strategy='sample' only"):  # never ignored
        sampler("Ka", config, strategy="greedy")
    with pytest.raises(TypeError, match="Unknown generation option beams"):
        sampler("Ka", beams=2)


def test_command_line_prints_prompt_and_continuation(lm_run, tmp_path):
    """... streamed or whole; a whole result's program is kept in the command's compilation cache
    (a streaming program calls back to Python, and JAX keeps no such program)."""
    sampler = Sampler.load(lm_run)
    expected = "Ka to" + sampler("Ka to", max_new_tokens=6)
    env = subprocess_env()
    cache = tmp_path / "xla"
    command = [sys.executable, "-m", "transformer.sample", str(lm_run), "--prompt", "Ka to", "--strategy", "greedy",
               "--max-new-tokens", "6", "--compilation-cache", str(cache)]
    for whole in (False, True):
        result = subprocess.run(command + ["--no-stream"] * whole, env=subprocess_env(JAX_COMPILATION_CACHE_DIR=""),
                                capture_output=True, text=True, timeout=300)  # not the test session's cache
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.splitlines()[-1] == expected
        assert "Warning" not in result.stderr, result.stderr  # e.g. runpy's "found in sys.modules"
    assert list(cache.glob("jit__generate-*-cache")), sorted(cache.iterdir())
    missing = subprocess.run([sys.executable, "-m", "transformer.sample", str(lm_run.parent / "nothing")],
                             env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and "nothing is not a directory (a training run's" in missing.stderr


def command_error(arguments: list[str], capsys) -> str:
    """The error of a sampling command that fails: exit status 1, one `error:` line, nothing shown."""
    assert sample_command(arguments) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, (out, err)
    return err


@pytest.mark.parametrize(
    "config, message",
    [
        ("task: [causal_lm\n", r"config.yaml is not valid YAML: expected ',' or '\]', but got .*\(line 2, column 1\)"),
        ("task: causal_lm\nmodel: {d_model: 32}\n", r"config.yaml has no valid model: .* missing 3 required .*; restore"),
        (b"task: causal_lm\nmodel: {}\n# \xff\n", "config.yaml holds bytes that are not UTF-8 text; restore"),
    ],
)
def test_a_broken_run_config_is_one_error_line(tmp_path, capsys, config, message):
    (tmp_path / "config.yaml").write_bytes(config if isinstance(config, bytes) else config.encode())
    assert re.search(message, command_error([str(tmp_path), "--prompt", "Ka"], capsys))


def test_the_command_line_samples_uniformly_among_the_top_k(lm_run, capsys):
    """--top-k-uniform leaves out the command line's default temperature, which it would refuse."""
    assert sample_command([str(lm_run), "--prompt", "Ka", "--top-k", "3", "--top-k-uniform", "--max-new-tokens", "2",
                           "--no-stream"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Ka") and not err, (out, err)


def test_the_command_line_checks_a_prompt_before_showing_it(lm_run, capsys, monkeypatch):
    """A prompt too long for the context, streamed or not, is an error before the prompt is shown;
    so is input that is not UTF-8 (as Python reads it in a C locale), not a tokenizer's traceback."""
    for whole in ([], ["--no-stream"]):
        err = command_error([str(lm_run), "--prompt", "Ka " * 100, "--strategy", "greedy", *whole], capsys)
        assert "exceeds the model's context of 64 tokens" in err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Ka \xff to\n"), "utf-8", "surrogateescape"))
    err = command_error([str(lm_run), "--strategy", "greedy"], capsys)
    assert "The prompt 'Ka \\udcff to' is not text: character 3 is '\\udcff', a lone surrogate" in err


def test_bad_input_is_a_clear_error(lm_run, tmp_path, capsys):
    ignored = ["--strategy", "greedy", "--temperature", "3"]  # an error, not ignored
    assert sample_command([str(lm_run), "--prompt", "Ka", *ignored]) == 1
    assert "temperature=3.0 applies to strategy='sample' only" in capsys.readouterr().err
    for flags, message in [
        (["--strategy", "greedy", "--num-beams", "4"], "num_beams=4 applies to strategy='beam' only"),  # its default
        (["--temperature", "inf"], "temperature must be a finite number > 0 when sampling, got inf"),
        (["--seed", str(2**63)], r"seed must be from -2\*\*63 to 2\*\*63 - 1, got 9223372036854775808"),
        (["--top-k-uniform"], "top_k_uniform=True picks uniformly among the top_k tokens: give top_k too"),
        (["--top-k", "5", "--top-k-uniform", "--top-p", "0.9"], "top_p=0.9 would have no effect with top_k_uniform"),
        (["--length-penalty-form", "gnmt"], "length_penalty_form='gnmt' applies to strategy='beam' only"),
    ]:
        assert re.search(message, command_error([str(lm_run), "--prompt", "Ka", *flags], capsys))
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
    with pytest.raises(ValueError, match="exceeds the model's context"):  # when called, before any piece is asked for
        sampler.stream("Ka " * 100, max_new_tokens=8)
    with pytest.raises(TypeError, match="seed must be a whole number, got float 1.5"):
        sampler("Ka", seed=1.5)
    with pytest.raises(ValueError, match=r"seed must be from -2\*\*63 to 2\*\*63 - 1"):
        sampler.stream("Ka", seed=-(2**63) - 1)
    with pytest.raises(ValueError, match="The prompt 'Ka\\\\udcff' is not text"):
        sampler(["Ka", "Ka\udcff"])
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


def test_text_attention_labels_a_translation_and_its_source(translation_run, tmp_path):
    """Cross-attention rows are the greedy translation's pieces (after BOS), columns the source's
    (+ EOS); every row is a distribution; the command line writes one heatmap per attention."""
    run = load_run(translation_run)
    tok, text = run.tokenizer, "Ka to bo"
    translation = Sampler.load(translation_run)(text, strategy="greedy", max_new_tokens=63)
    maps = text_attention(run, text)
    assert set(maps) == {"encoder/self_attention", "decoder/self_attention", "decoder/cross_attention"}
    source = [tok.id_to_token(i) for i in tok.encode(text) + [tok.eos_id]]
    cross = maps["decoder/cross_attention"]
    target = cross.queries  # BOS + the generated pieces, which read as the sampler's translation
    assert target[0] == tok.id_to_token(tok.bos_id) and tok.decode([tok.token_to_id(p) for p in target[1:]]) == translation
    assert cross.keys == source and len(target) <= run.model.config.max_length
    assert cross.weights.shape == (1, 2, len(target), len(source))  # [layers, heads, T, S]
    np.testing.assert_allclose(cross.weights.sum(-1), 1.0, rtol=1e-5)
    assert maps["encoder/self_attention"].keys == source and maps["decoder/self_attention"].keys == target

    assert show_attention.main([str(translation_run), "--text", text, "--out", str(tmp_path), "--head", "1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "decoder_cross_attention_layer0_head1.png", "decoder_self_attention_layer0_head1.png",
        "encoder_self_attention_layer0_head1.png"]
    refused = tmp_path / "refused"  # checked before anything is written
    assert show_attention.main([str(translation_run), "--text", text, "--out", str(refused), "--head", "2"]) == 1
    assert not refused.exists()


def test_text_attention_of_a_language_model_is_causal(lm_run):
    maps = text_attention(load_run(lm_run), "Ka to bo ni")
    (attention,) = maps.values()
    assert attention.queries == attention.keys and len(attention.keys) == attention.weights.shape[-1]
    assert np.all(np.triu(attention.weights, k=1) == 0)


def test_translation_bleu_scores_greedy_and_beam_translations(translation_run):
    """The run's BLEU figures score what the sampler writes: greedy ("bleu") and beam search with
    length penalty 0.6 ("bleu_beam"). Each is 100 against its own outputs as
    references and below 100 against the other's."""
    run = load_run(translation_run)
    config = config_lib.load_yaml(translation_run / "config.yaml").replace(bleu_examples=3, bleu_beams=3)
    sampler, sources = Sampler.load(translation_run), synthetic.sentences(3, 5)
    outputs = {
        "bleu": sampler(sources, strategy="greedy", max_new_tokens=config.seq_length),
        "bleu_beam": sampler(sources, strategy="beam", num_beams=3, length_penalty=0.6, max_new_tokens=config.seq_length),
    }
    assert outputs["bleu"] != outputs["bleu_beam"] and all(outputs["bleu"]) and all(outputs["bleu_beam"])
    for name, references in outputs.items():
        examples = [{"source": s, "target": t} for s, t in zip(sources, references)]
        data = tasks.TaskData(train=None, validation=None, validation_examples=examples, baselines={})
        metrics, _ = tasks.translation_bleu(config, run.model, run.params, run.tokenizer, data)
        assert metrics[name] == pytest.approx(100.0)
        assert metrics[({"bleu", "bleu_beam"} - {name}).pop()] < 100.0


def test_text_attention_names_and_stacks_layers_alike_scanned_or_not(lm_run):
    """An unscanned stack's per-layer entries come back under the scanned names, stacked in
    layer order, with the same weights."""
    run = load_run(lm_run)
    model = type(run.model)(run.model.config.replace(num_decoder_layers=3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), *run.task.example_inputs())
    scanned = text_attention(dataclasses.replace(run, model=model, params=variables["params"]), "Ka to bo ni")
    flat_model, flat_variables = unscanned(model, nn.meta.unbox(variables))
    flat = text_attention(dataclasses.replace(run, model=flat_model, params=flat_variables["params"]), "Ka to bo ni")
    assert list(flat) == list(scanned) == ["decoder/self_attention"]
    assert scanned["decoder/self_attention"].weights.shape[0] == 3
    np.testing.assert_allclose(flat["decoder/self_attention"].weights, scanned["decoder/self_attention"].weights, atol=1e-5)
    assert flat["decoder/self_attention"].keys == scanned["decoder/self_attention"].keys
