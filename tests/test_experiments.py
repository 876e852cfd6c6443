"""Every named experiment trains a few steps (at tiny size) on its real data set and its loss
goes down; the README's main-job command produces a run directory and a sample."""

import json
import pathlib
import re
import subprocess
import sys

import pytest
from processes import ROOT, subprocess_env

from train import config as config_lib
from train import loop

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
}


def train_losses(run_dir: pathlib.Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]


def run_experiment(name: str, run_dir: pathlib.Path, *extra: str) -> loop.RunResult:
    args = [name, *SHORT, *SHRINK, *SIZES.get(name, []), f"run_dir={run_dir}", *extra]
    return loop.run(config_lib.parse_args(args), progress=False)


@pytest.fixture(scope="module")
def pretrained_bert(tmp_path_factory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("bert-tiny-mlm") / "run"
    run_experiment("bert-tiny-mlm", run_dir)
    return run_dir


@pytest.mark.network
@pytest.mark.parametrize("name", [n for n in config_lib.EXPERIMENTS if n not in ("gpt-tiny", "bert-tiny-sentiment")])
def test_experiment_trains_and_its_loss_goes_down(name, tmp_path):
    """(gpt-tiny, the default, is the README test's; bert-tiny-sentiment needs a pretrained body.)"""
    extra = ["bleu_examples=4"] if name == "transformer-tiny-en-fr" else []
    result = run_experiment(name, tmp_path / "run", *extra)
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert result.step == 16 and {"loss", "accuracy"} <= set(result.validation)
    task = config_lib.EXPERIMENTS[name].task
    if name == "transformer-tiny-en-fr":
        assert 0.0 <= result.validation["bleu"] <= 100.0 and " -> " in result.sample
    if task == "masked_lm":
        assert 0.0 <= result.validation["nsp_accuracy"] <= 1.0


@pytest.mark.network
def test_sentiment_fine_tunes_the_pretrained_body(pretrained_bert, tmp_path):
    run_dir = tmp_path / "run"
    result = run_experiment(
        "bert-tiny-sentiment", run_dir, f"init_from={pretrained_bert}", "steps=60", "log_every=20", "batch_size=32",
        "learning_rate=1e-3",
    )
    losses = train_losses(run_dir)
    assert losses[-1] < losses[0], losses
    assert json.loads((run_dir / "labels.json").read_text()) == ["negative", "positive"]
    assert (run_dir / "tokenizer.model").read_bytes() == (pretrained_bert / "tokenizer.model").read_bytes()
    assert 0.0 <= result.validation["accuracy"] <= 1.0


@pytest.mark.network
def test_readme_main_job_command_writes_a_run_directory_and_a_sample(tmp_path):
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^(python -m train)\s+# run the main job", readme, flags=re.MULTILINE)
    assert command, "README must show the main-job command"
    args = command.group(1).split()[1:] + [
        "steps=20", "log_every=5", "eval_every=1000", "eval_batches=1", "batch_size=8", "sample_tokens=16",
    ]
    result = subprocess.run([sys.executable, *args], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^sample: ROMEO:", result.stdout, flags=re.MULTILINE), result.stdout[-2000:]
    run_dir = tmp_path / "runs" / "gpt-tiny"
    assert {"config.yaml", "tokenizer.model", "checkpoints", "metrics.jsonl", "loss.png"} <= {p.name for p in run_dir.iterdir()}
    losses = train_losses(run_dir)
    assert len(losses) == 4 and losses[-1] < losses[0], losses
