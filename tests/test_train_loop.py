"""The training job: config parsing, run directories, exact resume after SIGKILL and SIGTERM,
multi-process training, divergence handling and clear errors."""

import dataclasses
import errno
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import synthetic
from processes import ROOT, free_port, subprocess_env
from train import config as config_lib
from train import hugepages, loop, rundir, tasks
from train.__main__ import main, usage
from train.optim import learning_rate_schedule
from train.step import global_batch
from transformer.checkpoint import CheckpointUnreadable
from transformer.runs import load_run
from transformer.sampler import Sampler
from transformer.tasks import Task
from transformer.tokenizer import Tokenizer

TINY_MODEL = [
    "model=gpt2-tiny", "model.vocab_size=256", "model.d_model=32", "model.num_heads=2", "model.d_ff=64",
    "model.num_decoder_layers=1", "model.max_length=64",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("corpus")
    paths = {}
    for split, (count, seed) in {"train": (600, 0), "validation": (60, 1)}.items():
        paths[split] = str(folder / f"{split}.txt")
        pathlib.Path(paths[split]).write_text("\n".join(synthetic.sentences(count, seed)) + "\n")
    return paths


def tiny_args(corpus, run_dir, *extra) -> list[str]:
    return [
        *TINY_MODEL, f"train_files=[{corpus['train']}]", f"validation_files=[{corpus['validation']}]",
        "file_format=lines", "seq_length=32", "batch_size=8", "steps=12", "schedule=constant", "warmup_steps=2",
        "log_every=2",
        "eval_every=6", "eval_batches=2", "checkpoint_every=4", "sample_tokens=8", f"run_dir={run_dir}", *extra,
    ]


def train_process(args, **env) -> subprocess.Popen:
    """`python -m train ARGS` in a new process (environment variables added from `env`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "train", *args], cwd=ROOT, env=subprocess_env(**env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def finish(process: subprocess.Popen, timeout=300) -> str:
    output, _ = process.communicate(timeout=timeout)
    return output


def final_params(run_dir: pathlib.Path):
    """The step and parameters of the run's latest checkpoint, on this process's first device."""
    run = load_run(run_dir)
    return run.step, run.params


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def records(run_dir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- config and command line


def test_config_from_experiment_yaml_and_overrides(tmp_path):
    config = config_lib.parse_args(["transformer-tiny-en-fr", "steps=7", "model.num_decoder_layers=3", "seed=5"])
    assert config.task == Task.SEQ2SEQ and config.steps == 7 and config.model.num_decoder_layers == 3
    config_lib.save_yaml(config, tmp_path / "run.yaml")
    assert config_lib.load_yaml(tmp_path / "run.yaml") == config
    (tmp_path / "mine.yaml").write_text("experiment: bert-tiny-mlm\nsteps: 3\nmodel: {d_model: 64, num_heads: 2}\n")
    mine = config_lib.parse_args([str(tmp_path / "mine.yaml"), "learning_rate=1e-4"])
    assert (mine.task, mine.steps, mine.model.d_model, mine.learning_rate) == (Task.MASKED_LM, 3, 64, 1e-4)
    assert mine.model.num_encoder_layers == config_lib.EXPERIMENTS["bert-tiny-mlm"].model.num_encoder_layers
    assert config_lib.parse_args([]) == config_lib.EXPERIMENTS[config_lib.DEFAULT_EXPERIMENT]
    (tmp_path / "short.yaml").write_text("batch_size: 8\n")  # over the default experiment, as --help says
    short = config_lib.parse_args([str(tmp_path / "short.yaml")])
    assert short == config_lib.EXPERIMENTS[config_lib.DEFAULT_EXPERIMENT].replace(batch_size=8)
    # A model field and a training field that are only valid together are checked together.
    longer = config_lib.parse_args(["bert-tiny-mlm", "seq_length=256", "model.max_length=256"])
    assert (longer.seq_length, longer.model.max_length, longer.model.d_model) == (256, 256, 128)
    rope = config_lib.parse_args(["model=gpt2-tiny", "model.position=rope", "model.num_heads=2"])
    assert (rope.model.position, rope.model.num_heads, rope.model.d_model) == ("rope", 2, 64)


@pytest.mark.parametrize(
    "args, message",
    [
        (["stepz=3"], "Unknown config key(s) 'stepz'; valid keys: task, model"),
        (["gpt-huge"], "Unknown experiment 'gpt-huge'; valid experiments: gpt-quick, gpt-tiny, bert-tiny-mlm"),
        (["model.d_modle=3"], "Unknown ModelConfig field(s) 'd_modle'"),
        (["steps=many"], "steps must be of type int, got 'many'"),
        (["schedule=linear"], "schedule='linear' is not valid; use one of: inverse_sqrt, cosine, constant"),
        (["batch_size=30", "accumulation=4"], "batch_size=30 is not divisible by accumulation=4"),
        (["model=bert-tiny"], "task=causal_lm needs a model with a decoder only"),
        (["minilm-squad", "doc_stride=200"], "seq_length=128 leaves 93 context pieces per window after a question of "
         "max_question_length=32 and [CLS], [SEP], [SEP]; doc_stride=200 must be in [1, 93]"),
        (["minilm-squad", "seq_length=32"], "seq_length=32 leaves no context after a question of max_question_length=32"),
        (["bert-tiny-sentiment", "doc_stride=8"], "doc_stride, max_question_length, max_answer_length apply to "
         "task=question_answering only"),
        (["bert-tiny-sentiment", "model=t5-tiny"],
         "task=classification needs a model with an encoder only (num_decoder_layers=0) or a decoder only"),
        (["seq_length=4096"], "seq_length=4096 exceeds the model's max_length=256"),
        (["gpt-tiny", "steps"], "Cannot parse override 'steps'"),
    ],
)
def test_bad_config_is_a_clear_error(args, message):
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        config_lib.parse_args(args)
    assert message in str(error.value)


def test_help_lists_experiments_and_keys(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in config_lib.EXPERIMENTS)
    assert all(f"  {key} " in text for key in config_lib.FIELDS)
    assert "global batch in examples" in text  # the field comments are the key help
    assert main(["nonsense=1"]) == 2
    assert "Unknown config key(s) 'nonsense'" in capsys.readouterr().err
    assert usage().startswith("usage: python -m train")


@pytest.mark.skipif(not hugepages._glibc_with_hugetlb(), reason="needs glibc 2.35+ and huge pages")
def test_train_command_restarts_once_with_huge_pages(tmp_path):
    """`python -m train` restarts itself once, with glibc's huge-page tunable added and its own
    arguments and interpreter options kept (-X importtime shows each start importing
    train.hugepages); a GLIBC_TUNABLES that names the tunable is left alone, and a program that
    runs `train` inside itself is not restarted."""

    def run(command, **env):
        environ = subprocess_env(**env)
        if not env:
            environ.pop("GLIBC_TUNABLES", None)  # as where nobody set it
        return subprocess.run([sys.executable, *command], cwd=ROOT, env=environ, capture_output=True, text=True,
                              check=True, timeout=120)

    def starts(**env) -> int:
        result = run(["-X", "importtime", "-m", "train", "--help"], **env)
        assert result.stdout.startswith("usage: python -m train")
        return result.stderr.count(" train.hugepages\n")

    assert starts() == 2
    assert starts(GLIBC_TUNABLES="glibc.malloc.hugetlb=0") == 1
    script = tmp_path / "show.py"
    script.write_text("import os, sys\nprint('start', flush=True)\nfrom train.hugepages import reexec_with_huge_pages\n"
                      "reexec_with_huge_pages()\nprint(os.environ['GLIBC_TUNABLES'], sys.argv[1:])\n")
    output = run([str(script), "a", "b c"], GLIBC_TUNABLES="glibc.malloc.arena_max=2").stdout
    assert output == "start\nstart\nglibc.malloc.arena_max=2:glibc.malloc.hugetlb=1 ['a', 'b c']\n"
    # run inside another program (as a notebook kernel would), it must not restart that program
    host = ("import runpy, sys\nprint('host started', flush=True)\nsys.argv = ['train', '--help']\n"
            "runpy.run_module('train', run_name='__main__')")
    assert run(["-c", host]).stdout.count("host started") == 1


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> pathlib.Path:
    """A tiny run trained without interruption."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    output = finish(train_process(tiny_args(corpus, run_dir)))
    assert "Done: " in output, output[-3000:]
    return run_dir


def test_run_directory_holds_everything_a_sampler_needs(reference, corpus):
    names = {p.name for p in reference.iterdir()}
    assert {"config.yaml", "tokenizer.model", "checkpoints", "metrics.jsonl", "tensorboard", "loss.png"} <= names
    assert config_lib.load_yaml(reference / "config.yaml").steps == 12
    assert any((reference / "tensorboard").iterdir())
    steps, params = final_params(reference)
    assert steps == 12
    log = records(reference)
    train_losses = [r["loss"] for r in log if r["split"] == "train"]
    assert train_losses[-1] < train_losses[0]
    validation = [r for r in log if r["split"] == "validation"]
    assert [r["step"] for r in validation] == [6, 12] and all(r["sample"] for r in validation)
    assert {"loss", "perplexity", "accuracy"} <= set(validation[-1])
    # Loss per character: the loss per token times the validation text's predicted tokens per
    # character (a line is a document here: its first token is not predicted, its EOS is and
    # counts as one character).
    lines = [line for line in pathlib.Path(corpus["validation"]).read_text().splitlines() if line.strip()]
    tokens = sum(len(Tokenizer.load(reference).encode(line)) for line in lines)
    tokens_per_character = tokens / sum(len(line) + 1 for line in lines)
    assert validation[-1]["nats_per_char"] == pytest.approx(validation[-1]["loss"] * tokens_per_character, rel=1e-5)
    baseline = next(r for r in log if r["split"] == "baseline")
    assert baseline["unigram_nats_per_char"] == pytest.approx(baseline["unigram_loss"] * tokens_per_character, rel=1e-5)
    # A sampler loaded from the directory reproduces the run's last sample (same options, same seed).
    continuation = Sampler.load(reference)("ROMEO:", max_new_tokens=8, strategy="sample", temperature=0.8, top_k=40)
    assert validation[-1]["sample"] == "ROMEO:" + continuation


# Long enough that a signal sent when the first checkpoint appears arrives mid-run.
LONG = ("steps=300", "eval_every=1000", "checkpoint_every=50", "log_every=10")


@pytest.fixture(scope="module")
def long_reference(corpus, tmp_path_factory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("long_reference") / "run"
    output = finish(train_process(tiny_args(corpus, run_dir, *LONG)))
    assert "Done: " in output, output[-3000:]
    return run_dir


def start_and_wait_for_checkpoint(args, run_dir: pathlib.Path, step: int = 50, **env) -> subprocess.Popen:
    process = train_process(args, **env)
    while not (run_dir / "checkpoints" / str(step)).is_dir():
        assert process.poll() is None, finish(process)[-3000:]
        time.sleep(0.02)
    return process


def test_resume_after_sigkill_is_bitwise_identical(corpus, long_reference, tmp_path):
    run_dir = tmp_path / "run"
    process = start_and_wait_for_checkpoint(tiny_args(corpus, run_dir, *LONG), run_dir)
    process.kill()
    finish(process)
    assert process.returncode == -signal.SIGKILL
    killed_at = final_params(run_dir)[0]
    assert killed_at < 300
    with open(run_dir / "metrics.jsonl", "a") as log:  # what a full disk leaves: a cut-off last line
        log.write('{"step": 7, "split": "tra')
    output = finish(train_process(tiny_args(corpus, run_dir, *LONG)))
    assert f"Resumed {run_dir} at step {killed_at}" in output, output[-3000:]
    assert "metrics.jsonl: dropped line(s)" in output
    assert_bitwise_equal(final_params(run_dir)[1], final_params(long_reference)[1])
    # The log reads as if the run had never stopped: what was logged after the checkpoint is dropped.
    steps = lambda run: [(r["step"], r["split"]) for r in records(run)]
    assert steps(run_dir) == steps(long_reference)
    losses = lambda run: [r["loss"] for r in records(run) if r["split"] == "train"]  # the first step after
    assert losses(run_dir) == pytest.approx(losses(long_reference), rel=1e-6)  # the resume counts too


def test_sigterm_saves_and_the_run_resumes(corpus, long_reference, tmp_path):
    """... and the resumed process loads the training step its first process compiled, from the
    run's own compilation cache (not the test session's)."""
    run_dir = tmp_path / "run"
    args = tiny_args(corpus, run_dir, *LONG, f"compilation_cache={tmp_path / 'xla'}")
    process = start_and_wait_for_checkpoint(args, run_dir, JAX_COMPILATION_CACHE_DIR="")
    process.send_signal(signal.SIGTERM)
    output = finish(process)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    stopped_at = final_params(run_dir)[0]
    assert f"Stopped by SIGTERM at step {stopped_at}" in output and 50 <= stopped_at < 300
    output = finish(train_process(args, JAX_COMPILATION_CACHE_DIR="", JAX_LOG_COMPILES="1"))
    assert f"Resumed {run_dir} at step {stopped_at}" in output, output[-3000:]
    assert "Persistent compilation cache hit for 'jit_train_step'" in output, output[-3000:]
    assert_bitwise_equal(final_params(run_dir)[1], final_params(long_reference)[1])


def snapshot(run_dir: pathlib.Path) -> dict[str, bytes]:
    """Every file of a run directory (but its lock) by relative path, with its bytes."""
    return {
        str(path.relative_to(run_dir)): path.read_bytes()
        for path in sorted(run_dir.rglob("*")) if path.is_file() and path.name != ".lock"
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ("learning_rate=0.5", r"different configuration \(learning_rate: saved 0.00\d, now 0.5\)"),
        ("model.d_ff=48", r"different configuration \(model.d_ff: saved 64, now 48\)\. Resume"),
    ],
)
def test_resuming_with_a_different_config_is_an_error_naming_the_fields(corpus, reference, change, message):
    before = snapshot(reference)
    config = config_lib.parse_args(tiny_args(corpus, reference, change))
    with pytest.raises(ValueError, match=message):
        loop.run(config, progress=False)
    assert snapshot(reference) == before  # nothing was overwritten


def test_runs_saved_with_another_remat_policy_or_attention_implementation_resume(tmp_path):
    """Those change how a step is computed, not what: a run saved before remat became the default
    resumes; a change of architecture still does not."""
    config = config_lib.EXPERIMENTS["gpt-tiny"]
    older = config.model.replace(remat_policy="none", attention_implementation="chunked")
    config_lib.save_yaml(dataclasses.replace(config, model=older), tmp_path / "config.yaml")
    loop._check_resumable(config, tmp_path)
    wider = dataclasses.replace(config, model=config.model.replace(d_ff=2 * config.model.d_ff))
    with pytest.raises(ValueError, match="model.d_ff: saved 1024, now 2048"):
        loop._check_resumable(wider, tmp_path)


def test_a_finished_run_changes_nothing_and_refuses_fewer_steps(corpus, reference, capsys):
    before = snapshot(reference)
    result = loop.run(config_lib.parse_args(tiny_args(corpus, reference)), progress=False)
    assert "has finished its 12 steps; nothing to do" in capsys.readouterr().out
    last = [r for r in records(reference) if r["split"] == "validation"][-1]
    assert result.step == 12 and result.sample == last["sample"] and result.validation["loss"] == last["loss"]
    with pytest.raises(ValueError, match="steps=6 is below step 12, which .* has already trained; raise steps"):
        loop.run(config_lib.parse_args(tiny_args(corpus, reference, "steps=6")), progress=False)
    assert snapshot(reference) == before


def test_a_second_process_on_a_live_run_directory_is_refused(corpus, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("a config the second run must not overwrite\n")
    with rundir.RunLock(run_dir):
        with pytest.raises(rundir.RunDirectoryBusy, match=f"is in use by process {os.getpid()} on "):
            loop.run(config_lib.parse_args(tiny_args(corpus, run_dir)), progress=False)
    assert (run_dir / "config.yaml").read_text() == "a config the second run must not overwrite\n"


def test_a_lock_left_by_a_killed_process_is_detected_as_stale(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from train.rundir import RunLock; import pathlib, time; "
         f"lock = RunLock(pathlib.Path({str(tmp_path)!r})); lock.acquire(); print('locked', flush=True); time.sleep(600)"],
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(rundir.RunDirectoryBusy, match=f"in use by process {holder.pid} on "):
        rundir.RunLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    lock = rundir.RunLock(tmp_path)
    assert f"process {holder.pid} on " in lock.acquire()  # the stale holder, named for the message
    lock.release()
    assert rundir.RunLock(tmp_path).acquire() == ""  # a clean exit leaves nothing behind


def test_the_lock_holds_when_its_file_is_deleted(tmp_path):
    """.lock looks stale after a crash; deleting it let a second trainer onto a live run directory."""
    with rundir.RunLock(tmp_path):
        (tmp_path / ".lock").unlink()
        with pytest.raises(rundir.RunDirectoryBusy, match=f"{tmp_path} is in use by another process"):
            rundir.RunLock(tmp_path).acquire()
    assert rundir.RunLock(tmp_path).acquire() == ""  # free once its holder releases it


def test_a_lock_that_could_not_be_written_is_not_held(tmp_path, monkeypatch):
    """A full disk while .lock is written fails the start; the lock it took is let go, so that the
    next start in the same process (once space is freed) is not refused as busy."""
    write_text = pathlib.Path.write_text

    def full_disk(path, *args, **kwargs):
        if path.name == ".lock":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        rundir.RunLock(tmp_path).acquire()
    monkeypatch.undo()
    lock = rundir.RunLock(tmp_path)
    assert lock.acquire() == ""
    lock.release()


def test_a_damaged_artefacts_record_is_an_error_naming_it_and_the_fix(tmp_path):
    (tmp_path / "artefacts.json").write_text('{"tokenizer.model": {"trained_on": ')  # cut off by a full disk
    with pytest.raises(ValueError, match=rf"{tmp_path / 'artefacts.json'} is damaged \(Expecting value: .*\); it "
                                         r"records what made each file of the run\. Put back a good copy, or "
                                         r"delete it"):
        rundir.Artefacts(tmp_path)


def test_files_changed_since_the_run_made_them_are_refused_by_resume_and_the_sampler(corpus, reference, tmp_path,
                                                                                    monkeypatch):
    """A tokenizer.model replaced in the run directory (another tokenization than the checkpoints
    learnt), or validation texts changed between starts, are refused, naming the file and the fix;
    a run directory recorded before digests were kept still opens."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    Tokenizer.train([corpus["train"]], 256, model_prefix=tmp_path / "other", model_type="unigram")
    shutil.copyfile(tmp_path / "other.model", run_dir / "tokenizer.model")
    before = snapshot(run_dir)
    replaced = rf"{run_dir / 'tokenizer.model'} is not the file this run was made with \(sha256 \w+ recorded in .*Put"
    with pytest.raises(ValueError, match=replaced):
        load_run(run_dir)
    with pytest.raises(ValueError, match=replaced):
        loop.run(config_lib.parse_args(tiny_args(corpus, run_dir, "steps=14")), progress=False)
    assert snapshot(run_dir) == before
    shutil.copyfile(reference / "tokenizer.model", run_dir / "tokenizer.model")
    load_splits = loop.load_splits

    def validation_edited(config):
        train, validation, names = load_splits(config)
        return train, validation[1:], names

    monkeypatch.setattr(loop, "load_splits", validation_edited)
    with pytest.raises(ValueError, match=r"checkpoints was made from something else .*\(validation_data: sha256 \w+ "
                                         r"then, sha256 \w+ now\)"):
        loop.run(config_lib.parse_args(tiny_args(corpus, run_dir, "steps=14")), progress=False)
    records = json.loads((run_dir / "artefacts.json").read_text())
    (run_dir / "artefacts.json").write_text(json.dumps({name: {k: v for k, v in record.items() if k != "sha256"}
                                                        for name, record in records.items()}))
    assert load_run(run_dir).step == 12


def test_files_of_an_aborted_attempt_with_other_data_are_refused(corpus, reference, tmp_path):
    """An attempt killed after making its tokenizer leaves tokenizer.model and its record; a new
    start with other data must not train with it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("tokenizer.model", "artefacts.json"):
        shutil.copyfile(reference / name, run_dir / name)
    other = tiny_args(corpus, run_dir, f"train_files=[{corpus['validation']}]")
    with pytest.raises(ValueError, match=r"tokenizer.model was made from something else .*trained_on: sha256 \w+ then"):
        loop.run(config_lib.parse_args(other), progress=False)
    with pytest.raises(ValueError, match=r"vocab_size: 256 then, 128 now"):
        loop.run(config_lib.parse_args(tiny_args(corpus, run_dir, "model.vocab_size=128")), progress=False)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "config.yaml").exists()


def test_a_vocabulary_too_large_for_the_training_texts_names_them_and_the_setting(corpus, tmp_path):
    args = tiny_args(corpus, tmp_path / "run", "model.vocab_size=8000")
    with pytest.raises(ValueError, match=rf"No 8000-piece tokenizer .* \({corpus['train']}\): Vocabulary size too "
                                         r"high \(8000\)\. Please set it to a value <= \d+\. Lower model.vocab_size"):
        loop.run(config_lib.parse_args(args), progress=False)
    assert not (tmp_path / "run").exists()  # refused before writing anything: no directory left behind


def test_a_tokenizer_smaller_than_the_model_vocabulary_is_refused(corpus, reference, tmp_path):
    args = tiny_args(corpus, tmp_path / "run", f"tokenizer={reference / 'tokenizer.model'}", "model.vocab_size=300")
    with pytest.raises(ValueError, match=r"tokenizer has 256 pieces but the model's vocab_size is 300.*model.vocab_size=256"):
        loop.run(config_lib.parse_args(args), progress=False)


def test_a_mesh_the_devices_cannot_form_is_refused_before_anything_is_written(corpus, tmp_path):
    """... and leaves no run directory behind (it left an empty one, holding .lock); a directory
    that was there before stays."""
    mesh = f"mesh_fsdp={jax.device_count() + 1}"
    for run_dir in (tmp_path / "runs" / "new", tmp_path):
        with pytest.raises(ValueError, match=r"cannot be split into mesh axes .* lower them \(mesh_data, mesh_fsdp"):
            loop.run(config_lib.parse_args(tiny_args(corpus, run_dir, mesh)), progress=False)
    assert not (tmp_path / "runs").exists()
    assert (tmp_path / ".lock").read_text() == ""  # released


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_an_unusable_run_dir_is_one_clear_line(corpus, tmp_path, capsys, kind):
    if kind == "file":
        run_dir = tmp_path / "run"
        run_dir.write_text("not a directory")
        expected = "is a file, not a directory; choose another run_dir"
    else:
        run_dir = pathlib.Path("/sys/transformer-test-run")  # not writable, even by root
        expected = "is not writable"
    assert main(tiny_args(corpus, run_dir)) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and expected in error and len(error.splitlines()) == 1


def test_a_full_disk_is_one_clear_line(corpus, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "checkpoints"))

    monkeypatch.setattr(loop, "run", full)
    assert main(tiny_args(corpus, tmp_path / "run")) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: [Errno 28] No space left on device") and len(error.splitlines()) == 1
    assert "run the same command again to resume" in error


FULL_DISK_FROM_STEP_8 = """
import resource, runpy, signal, sys
from transformer import checkpoint

save = checkpoint.Checkpointer.save


def save_on_a_full_disk(self, step, *args, **kwargs):
    if step == 8:  # step 4 on disk, then no file grows past 4 KiB: step 8's writes fail, in Orbax's threads
        self.wait()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    return save(self, step, *args, **kwargs)


checkpoint.Checkpointer.save = save_on_a_full_disk
sys.argv = ["train", *sys.argv[1:]]
runpy.run_module("train", run_name="__main__")
"""


def test_a_disk_that_fills_during_an_asynchronous_save_is_one_clear_line(corpus, tmp_path, capsys):
    """Step 8's checkpoint cannot be written (its files may not grow: tensorstore's and Orbax's
    writes fail as on a full disk, in Orbax's threads). That printed about 800 lines, some 70
    tracebacks (absl's record of every failed thread, tensorstore's "Event loop is closed"), with
    tensorstore's error last. Once there is room again, the same command resumes."""
    run_dir = tmp_path / "run"
    args = tiny_args(corpus, run_dir, "log_every=4", "eval_every=4")  # all compiled by step 4; the logs stay small
    result = subprocess.run([sys.executable, "-c", FULL_DISK_FROM_STEP_8, *args], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    progress = re.compile(r"train: .*|\s*")  # the progress bar's updates, each ended by a carriage return
    lines = [line for line in re.split(r"[\r\n]", result.stderr) if not progress.fullmatch(line)]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"error: [Errno 27] Cannot write checkpoints in {run_dir / 'checkpoints'} (File too "
                               "large). Make the folder writable and check its free space; the steps already saved")
    assert lines[0].endswith("Once fixed, run the same command again to resume.")
    assert loop.run(config_lib.parse_args(args), progress=False).step == 12
    assert f"Resumed {run_dir} at step 4." in capsys.readouterr().out


def flip_a_bit(run_dir: pathlib.Path, step: int) -> None:
    """Damages a checkpoint step as a failing disk would: one bit of its largest file (same size)."""
    params = run_dir / "checkpoints" / str(step) / "params"
    largest = max((p for p in params.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 1
    largest.write_bytes(bytes(data))


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(corpus, reference, tmp_path):
    """A flipped bit in the newest step (same size: only its checksum tells) sends the resume to the
    step before, which `resume_step` also picks on purpose: both runs end bitwise equal."""
    damaged, chosen = tmp_path / "damaged", tmp_path / "chosen"
    for copy in (damaged, chosen):
        shutil.copytree(reference, copy)
    flip_a_bit(damaged, 12)
    outputs = {
        run_dir: finish(train_process(tiny_args(corpus, run_dir, "steps=16", *extra)))
        for run_dir, extra in ((damaged, ()), (chosen, ("resume_step=8",)))
    }
    assert "Checkpoint step 12 cannot be read (params/" in outputs[damaged], outputs[damaged][-3000:]
    assert "differs from its checksum in checksums.json); moved it to" in outputs[damaged]
    assert "left in place" not in outputs[damaged]  # it was moved
    assert "resume_step=8: moved the newer step 12 to" in outputs[chosen], outputs[chosen][-3000:]
    for run_dir, output in outputs.items():
        assert f"Resumed {run_dir} at step 8." in output
        aside = list((run_dir / "set_aside").iterdir())
        assert len(aside) == 1 and (aside[0] / "params").is_dir()  # moved, never deleted
    assert_bitwise_equal(final_params(damaged)[1], final_params(chosen)[1])
    assert final_params(damaged)[0] == 16


def test_the_sampler_falls_back_past_a_damaged_newest_step_and_moves_nothing(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    flip_a_bit(run_dir, 12)
    before = snapshot(run_dir)
    with pytest.warns(UserWarning, match=rf"Checkpoint step 12 of {run_dir} cannot be read \(params/.* differs from "
                                         r"its checksum in checksums.json\); it is left in place, and the step before"):
        run = load_run(run_dir)
    assert run.step == 8
    assert_bitwise_equal(run.params, load_run(run_dir, step=8).params)
    with pytest.raises(CheckpointUnreadable, match=r"\[4, 8\]; choose one with step=N \(--step N on the command "):
        load_run(run_dir, step=12)
    assert snapshot(run_dir) == before


def test_resume_step_reads_its_step_before_moving_any_and_goes_back_once(corpus, reference, tmp_path, capsys):
    """Going back to a damaged step is an error that moves nothing. Going back works once: the same
    command, run again (after a stop, or a preemption), goes on from the steps saved since."""
    damaged, run_dir = tmp_path / "damaged", tmp_path / "run"
    for copy in (damaged, run_dir):
        shutil.copytree(reference, copy)
    flip_a_bit(damaged, 8)
    with pytest.raises(loop.CheckpointUnreadable, match="checkpoints/8 cannot be read"):
        loop.run(config_lib.parse_args(tiny_args(corpus, damaged, "steps=16", "resume_step=8")), progress=False)
    assert sorted(int(p.name) for p in (damaged / "checkpoints").iterdir()) == [4, 8, 12]
    assert not (damaged / "set_aside").exists()
    command = tiny_args(corpus, run_dir, "steps=16", "resume_step=8")
    assert loop.run(config_lib.parse_args(command), progress=False).step == 16
    output = capsys.readouterr().out
    assert "Resumed" in output and re.search(r"step 16 validation \(16 of \d+ examples\): loss ", output)
    again = loop.run(config_lib.parse_args(command), progress=False)
    assert again.step == 16 and "has finished its 16 steps; nothing to do" in capsys.readouterr().out
    assert len(list((run_dir / "set_aside").iterdir())) == 1  # step 12 of the first attempt only
    result = loop.run(config_lib.parse_args([*command, "steps=18"]), progress=False)
    output = capsys.readouterr().out
    assert result.step == 18 and f"Resumed {run_dir} at step 16." in output
    assert "resume_step=8: an earlier start went back to it" in output


def test_a_stop_at_the_last_step_finishes_the_run(corpus, tmp_path, monkeypatch):
    """SIGTERM during the last step: the run evaluates, saves and plots as if no signal came (it
    used to stop, and a rerun found it finished without its final evaluation). Every step's
    metrics are logged, the first (compiling) one's too, timed or not."""
    fetched = 0

    def signalled(batch, mesh):
        nonlocal fetched
        fetched += 1
        if fetched == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return global_batch(batch, mesh)

    monkeypatch.setattr(loop, "global_batch", signalled)
    run_dir = tmp_path / "run"
    result = loop.run(config_lib.parse_args(tiny_args(corpus, run_dir, "steps=6", "log_every=1")), progress=False)
    assert result.stopped_by_signal is None and result.step == 6 and (run_dir / "loss.png").is_file()
    assert [r["step"] for r in records(run_dir) if r["split"] == "validation"] == [6]
    train = [r for r in records(run_dir) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(r["loss"]) for r in train)
    assert "steps_per_second" not in train[0] and all("steps_per_second" in r for r in train[1:])


class Killed(Exception):
    """What SIGTERM's default action (the process ends) becomes in a test."""


def test_a_signal_during_the_final_evaluation_waits_for_the_save(corpus, reference, tmp_path, monkeypatch):
    """A preemption while the last evaluation runs killed the run before it saved its last steps."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    evaluate = loop.evaluate

    def signalled(job, params):  # the evaluation after the last step: none other is due
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(job, params)

    def killed(signum, frame):
        raise Killed

    monkeypatch.setattr(loop, "evaluate", signalled)
    previous = signal.signal(signal.SIGTERM, killed)
    try:
        result = loop.run(config_lib.parse_args(tiny_args(corpus, run_dir, "steps=14")), progress=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.step == 14 and final_params(run_dir)[0] == 14
    assert [r["step"] for r in records(run_dir) if r["split"] == "validation"] == [6, 12, 14]


def test_a_run_stopped_between_log_steps_logs_as_if_it_never_stopped(corpus, reference, tmp_path, monkeypatch):
    """The interval open at the stop (step 5 of 6) is saved with the checkpoint: the resumed run's
    first record averages steps 5 and 6, like the uninterrupted run's, not step 6 alone."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    fetched = 0

    def signalled(batch, mesh):
        nonlocal fetched
        fetched += 1
        if fetched == 1:  # the batch of step 5
            os.kill(os.getpid(), signal.SIGTERM)
        return global_batch(batch, mesh)

    monkeypatch.setattr(loop, "global_batch", signalled)
    command = config_lib.parse_args(tiny_args(corpus, run_dir, "resume_step=4"))
    stopped = loop.run(command, progress=False)
    assert (stopped.stopped_by_signal, stopped.step) == (signal.SIGTERM, 5)
    monkeypatch.undo()
    assert loop.run(command, progress=False).step == 12
    steps = lambda run: [(r["step"], r["split"]) for r in records(run)]
    assert steps(run_dir) == steps(reference)
    losses = lambda run: [r["loss"] for r in records(run) if r["split"] == "train"]
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-6)


def test_interrupted_twice_ends_at_once_with_one_line():
    """The second Ctrl-C printed about 115 lines of chained tracebacks."""
    script = ("import os, signal, time\nfrom train.loop import StopSignals\nwith StopSignals():\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(60)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=subprocess_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 128 + signal.SIGINT
    assert result.stderr.strip().splitlines() == [
        "Interrupted twice: stopped at once, without saving. Run the same command again to resume from the last "
        "checkpoint."
    ]


@pytest.mark.parametrize("periodic", [["checkpoint_every=100"], ["checkpoint_every=4", "eval_every=4"]])
def test_repeated_nonfinite_steps_stop_the_run_without_saving_them(corpus, tmp_path, monkeypatch, periodic):
    """Also when the step that reaches the limit is due for a checkpoint and an evaluation."""
    causal_lm = tasks.TASKS[Task.CAUSAL_LM]

    def poisoned(*args, **kwargs):
        metrics = causal_lm.objective(*args, **kwargs)
        return dict(metrics, loss=metrics["loss"] * np.nan)

    monkeypatch.setitem(tasks.TASKS, Task.CAUSAL_LM, dataclasses.replace(causal_lm, objective=poisoned))
    config = config_lib.parse_args(tiny_args(corpus, tmp_path / "run", "max_nonfinite_steps=4", *periodic))
    with pytest.raises(loop.TrainingDiverged, match="the last 4 steps had non-finite gradients .* and were skipped"):
        loop.run(config, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_diverged_run_resumes_with_the_lower_learning_rate_its_message_advises(corpus, reference, tmp_path,
                                                                                  monkeypatch):
    """The message said to lower learning_rate and resume, and the resume refused the change."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    causal_lm = tasks.TASKS[Task.CAUSAL_LM]

    def poisoned(*args, **kwargs):
        metrics = causal_lm.objective(*args, **kwargs)
        return dict(metrics, loss=metrics["loss"] * np.nan)

    monkeypatch.setitem(tasks.TASKS, Task.CAUSAL_LM, dataclasses.replace(causal_lm, objective=poisoned))
    command = tiny_args(corpus, run_dir, "steps=24", "eval_every=100")  # 10 steps (max_nonfinite_steps) from 12
    with pytest.raises(loop.TrainingDiverged, match="run again with a lower learning_rate or more warmup_steps"):
        loop.run(config_lib.parse_args(command), progress=False)
    monkeypatch.undo()
    result = loop.run(config_lib.parse_args([*command, "learning_rate=5e-4"]), progress=False)
    assert result.step == 24 and config_lib.load_yaml(run_dir / "config.yaml").learning_rate == 5e-4
    with pytest.raises(ValueError, match="learning_rate: saved 0.0005, now 0.0001"):  # that start only
        loop.run(config_lib.parse_args([*command, "steps=26", "learning_rate=1e-4"]), progress=False)


def test_the_learning_rate_logged_is_the_one_the_last_update_used_when_steps_were_skipped(corpus, tmp_path,
                                                                                          monkeypatch):
    """A skipped step does not advance the optimizer's count, so its schedule falls behind the
    step number by the number of steps skipped; the log says the rate actually applied."""
    causal_lm = tasks.TASKS[Task.CAUSAL_LM]

    def sometimes_poisoned(model, params, batch, **kwargs):
        metrics = causal_lm.objective(model, params, batch, **kwargs)
        poisoned = batch["tokens"][0, 0] % 2 == 0  # the data decides: the same steps in every run
        return dict(metrics, loss=metrics["loss"] * jnp.where(poisoned, jnp.nan, 1.0))

    monkeypatch.setitem(tasks.TASKS, Task.CAUSAL_LM, dataclasses.replace(causal_lm, objective=sometimes_poisoned))
    config = config_lib.parse_args(tiny_args(corpus, tmp_path / "run", "warmup_steps=20", "max_nonfinite_steps=12"))
    loop.run(config, progress=False)
    schedule = learning_rate_schedule(config.schedule, config.learning_rate, config.warmup_steps, config.steps)
    train = [r for r in records(tmp_path / "run") if r["split"] == "train"]
    assert 0 < train[-1]["nonfinite_steps"] < 12  # some steps were skipped, not all
    skipped_before = 0
    for record in train:
        applied = record["step"] - record["nonfinite_steps"]
        assert record["learning_rate"] == pytest.approx(float(schedule(applied - 1)), rel=1e-6)
        if record["nonfinite_steps"] - skipped_before < 2:  # the interval of 2 steps applied one: its figures
            assert np.isfinite(record["loss"]) and np.isfinite(record["grad_norm"]), record
        skipped_before = record["nonfinite_steps"]


def test_a_saved_step_has_its_training_record_even_if_the_run_dies_right_after(corpus, tmp_path, monkeypatch):
    """Training records are read a step late; a checkpoint step writes its own before saving."""
    fetched = 0

    def dying(batch, mesh):
        nonlocal fetched
        fetched += 1
        if fetched == 5:  # the batch of step 5, just after checkpoint 4
            raise RuntimeError("the process died")
        return global_batch(batch, mesh)

    monkeypatch.setattr(loop, "global_batch", dying)
    config = config_lib.parse_args(tiny_args(corpus, tmp_path / "run", "log_every=4", "eval_every=100"))
    with pytest.raises(RuntimeError, match="the process died"):
        loop.run(config, progress=False)
    records, _ = rundir.read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert final_params(tmp_path / "run")[0] == 4
    assert [r["step"] for r in records if r["split"] == "train"] == [4]


def test_init_from_a_missing_run_is_a_clear_error(tmp_path):
    config = config_lib.experiment("bert-tiny-sentiment").replace(init_from=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="python -m train bert-tiny-mlm"):
        loop.run(config, progress=False)


def test_an_evaluation_of_a_few_batches_reads_the_same_sample_of_the_whole_split():
    """rt-polarity's validation split is ordered by label: its first batch was all negative, and
    eval_batches=1 reported 3.1% accuracy. Every evaluation reads the same batches, of one seeded
    shuffle of the split, and the log says how much of it they cover."""
    ordered = tasks.Split(grain.MapDataset.source([{"label": np.int32(i >= 32)} for i in range(64)]))
    config = config_lib.EXPERIMENTS["bert-tiny-sentiment"].replace(batch_size=16, eval_batches=2)
    labels = [np.concatenate([b["label"] for b in loop.validation_batches(ordered, config)]) for _ in range(2)]
    assert len(labels[0]) == 32 and 8 <= labels[0].sum() <= 24  # both labels, near their share of the split
    np.testing.assert_array_equal(labels[0], labels[1])
    assert loop.validation_coverage(ordered, config) == "32 of 64 examples"
    assert loop.validation_coverage(ordered, config.replace(eval_batches=0)) == "all 64 examples"
    assert loop.validation_coverage(ordered, config.replace(eval_batches=5)) == "all 64 examples"


def test_a_dataset_of_the_wrong_kind_is_a_clear_error(tmp_path):
    config = config_lib.experiment("gpt-tiny").replace(dataset="rt-polarity", run_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="'rt-polarity' holds classification data, but task=causal_lm needs lm data"):
        tasks.load_examples(config, "train")


def test_validation_files_replace_a_named_data_sets_validation_split(tmp_path, monkeypatch):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("my own held-out text\n")
    monkeypatch.setattr(tasks.datasets, "load_dataset", lambda name, split: [{"text": f"{name} {split}"}])
    config = config_lib.experiment("gpt-tiny").replace(validation_files=(str(held_out),))
    train, validation, _ = tasks.load_splits(config)
    assert train == [{"text": "shakespeare train"}]
    assert validation == [{"text": "my own held-out text"}]


# ----------------------------------------------------------------------------- multi-process


def test_two_processes_train_together_like_one(corpus, tmp_path):
    """Two jax.distributed CPU processes (gloo collectives, one device each) against one process
    with two devices: the same examples in every global batch (each process holds every other
    one), the same mesh; losses and parameters agree to float32 rounding. Dropout is off: its
    masks follow an example's row in the global batch, which differs between the two layouts."""
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    args = ("steps=6", "eval_every=100", "model.dropout_rate=0", "model.attention_dropout_rate=0")
    single = train_process(tiny_args(corpus, one_dir, *args), XLA_FLAGS="--xla_force_host_platform_device_count=2")
    address = f"localhost:{free_port()}"
    processes = [
        train_process(tiny_args(
            corpus, two_dir, *args, f"coordinator_address={address}", "num_processes=2", f"process_id={rank}",
        ))
        for rank in range(2)
    ]
    outputs = [finish(p) for p in [single, *processes]]
    assert all(p.returncode == 0 for p in [single, *processes]), "\n\n".join(o[-2000:] for o in outputs)
    text = pathlib.Path(corpus["validation"]).read_text()
    assert Tokenizer.load(one_dir / "tokenizer.model").encode(text) == Tokenizer.load(two_dir / "tokenizer.model").encode(text)
    one = [r["loss"] for r in records(one_dir) if r["split"] == "train"]
    two = [r["loss"] for r in records(two_dir) if r["split"] == "train"]
    assert len(one) == len(two) == 3
    np.testing.assert_allclose(two, one, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(final_params(two_dir)[1]), jax.tree.leaves(final_params(one_dir)[1])):
        # Adam divides by the root of the squared gradients, so where a gradient is at rounding
        # level its parameter moves by up to ~lr either way; 1e-4 is far below 6 steps at lr 2e-3.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)
