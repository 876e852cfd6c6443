"""Every named experiment runs end to end (at tiny size) on its real data set, and a fine-tune from
the pretrained body beats the majority (tests/test_recipes_learn.py: the other recipes learn)."""

import json
import pathlib

import pytest

from train import config as config_lib
from train import loop
from transformer.tokenizer import Tokenizer

SHORT = [
    "steps=16", "warmup_steps=2", "schedule=constant", "learning_rate=2e-3", "log_every=4", "eval_every=1000",
    "eval_batches=2", "batch_size=16", "seq_length=32", "source_length=32", "sample_tokens=0", "bleu_examples=0",
]
# Every architecture shrunk to a few seconds' width (full-size ones also in depth); their
# other choices (norms, positions, activations, dtype, remat) stay.
SHRINK = ["model.d_model=32", "model.num_heads=2", "model.d_ff=64", "model.vocab_size=512"]
SIZES = {
    "gpt2-small": ["model.num_decoder_layers=1"],
    "bert-base": ["model.num_encoder_layers=1"],
    "transformer-base": ["model.num_encoder_layers=1", "model.num_decoder_layers=1"],
    "t5-tiny-denoise": ["seq_length=8"],  # the targets span corruption makes of 32 source tokens
    "bert-tiny-ner": ["model.vocab_size=1400"],  # the Japanese text's 1,317 characters
    "minilm-distil": ["student_layers=1"],  # the student of the real teacher's layer 0
}


def train_losses(run_dir: pathlib.Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]


def run_experiment(name: str, run_dir: pathlib.Path, *extra: str) -> loop.RunResult:
    args = [name, *SHORT, *SHRINK, *SIZES.get(name, []), f"run_dir={run_dir}", *extra]
    return loop.run(config_lib.parse_args(args), progress=False)


@pytest.fixture(scope="module")
def pretrained_bert(tmp_path_factory) -> loop.RunResult:
    return run_experiment("bert-tiny-mlm", tmp_path_factory.mktemp("bert-tiny-mlm") / "run")


@pytest.fixture(scope="module")
def pretrained_t5(tmp_path_factory) -> loop.RunResult:
    return run_experiment("t5-tiny-denoise", tmp_path_factory.mktemp("t5-tiny-denoise") / "run")


@pytest.fixture(scope="module")
def distilled_minilm(tmp_path_factory) -> loop.RunResult:
    return run_experiment("minilm-distil", tmp_path_factory.mktemp("minilm-distil") / "run")


# gpt-tiny and the default (the same task and data) are the README test's; bert-tiny-sentiment,
# gpt-quick-sentiment, minilm-squad (whose 98k questions take a minute to window) and transformer-tiny-en-fr
# have tests of their own below; bert-tiny-mlm is the pretrained body they share. minilm-distil-sentiment is
# minilm-sentiment's recipe on a student (tests/test_distillation.py fine-tunes one).
TRAINED_HERE = [n for n in config_lib.EXPERIMENTS if "tiny" not in n and n not in (
    config_lib.DEFAULT_EXPERIMENT, "gpt-quick-sentiment", "minilm-squad", "minilm-distil-sentiment")]
# The variants' own rows, packing, pairs and spans; T5's span corruption, and its text-to-text fine-tune
# from that run (with the sentinels of the tokenizer it trained).
FAMILY = [
    "roberta-tiny-mlm", "albert-tiny-sop", "spanbert-tiny", "t5-tiny-denoise", "t5-tiny-sentiment", "bert-tiny-ner",
]
PRETRAINED = {"bert-tiny-mlm": "pretrained_bert", "t5-tiny-denoise": "pretrained_t5", "minilm-distil": "distilled_minilm"}


@pytest.mark.network
@pytest.mark.parametrize("name", TRAINED_HERE + ["bert-tiny-mlm"] + FAMILY)
def test_experiment_runs_end_to_end_on_its_data(name, tmp_path, request):
    """Each recipe runs end to end on its real data set (shrunk): fetched, tokenized, trained,
    evaluated with its task's metrics. That the recipes learn is the business of the tests
    below and the README test, which train long enough to show it."""
    if name in PRETRAINED:
        result = request.getfixturevalue(PRETRAINED[name])
    elif name == "t5-tiny-sentiment":
        pretrained = request.getfixturevalue("pretrained_t5").run_dir
        result = run_experiment(name, tmp_path / "run", f"init_from={pretrained}", "seq_length=4")
        assert Tokenizer.load(result.run_dir).sentinel_ids == Tokenizer.load(pretrained).sentinel_ids != frozenset()
        assert {"exact_match"} <= set(result.validation) and {"majority_exact_match"} == set(result.baselines)
    else:
        result = run_experiment(name, tmp_path / "run")
    losses = train_losses(result.run_dir)
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert result.step == 16 and {"loss", "accuracy"} <= set(result.validation)
    if name == "minilm-distil":  # the student learns the text and its teacher's states
        assert {"cosine_loss"} <= set(result.validation) and "kl_loss" not in result.validation
    if name == "spanbert-tiny":  # the span boundary objective, trained and evaluated beside the masked LM
        assert {"sbo_loss", "sbo_accuracy"} <= set(result.validation) and "nsp_loss" not in result.validation


@pytest.mark.network
def test_sentiment_fine_tune_beats_the_majority_class(pretrained_bert, tmp_path):
    """Fine-tuned from the pretrained body, the classifier beats the best constant answer on every
    held-out row by a clear margin (6 points; one standard error is ~2 on these 535 rows)."""
    run_dir = tmp_path / "run"
    result = run_experiment(
        "bert-tiny-sentiment", run_dir, f"init_from={pretrained_bert.run_dir}", "steps=300", "log_every=100",
        "batch_size=32", "learning_rate=1e-3", "eval_batches=0",
    )
    losses = train_losses(run_dir)
    assert losses[-1] < losses[0], losses
    assert json.loads((run_dir / "labels.json").read_text()) == ["negative", "positive"]
    assert (run_dir / "tokenizer.model").read_bytes() == (pretrained_bert.run_dir / "tokenizer.model").read_bytes()
    majority = result.baselines["majority_accuracy"]
    assert result.validation["accuracy"] > majority + 0.06, (result.validation, majority)
