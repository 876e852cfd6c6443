"""The recipes learn: each task, trained a little longer on data where what it must learn shows,
beats its baseline (BLEU over copying, NSP and SOP over chance, exact match, entity F1 and
accuracy over the majority's); the README's main-job command produces a run directory and a
sample. Apart from tests/test_experiments.py, so that the two run on different workers."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import synthetic
from processes import ROOT, subprocess_env
from test_experiments import run_experiment, train_losses

from train import config as config_lib


@pytest.mark.network
def test_translation_beats_copying_the_source(tmp_path):
    """BLEU of greedy translations of held-out verses above the BLEU of the untranslated sources."""
    result = run_experiment(
        "transformer-tiny-en-fr", tmp_path / "run", "steps=400", "log_every=100", "bleu_examples=32",
    )
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert " -> " in result.sample
    assert result.validation["bleu"] > result.baselines["copy_bleu"], (result.validation, result.baselines)


def test_pretraining_learns_next_sentence_prediction(tmp_path):
    """Where the document a sentence comes from shows in its words, MLM + NSP pretraining learns
    NSP: well above the 50% of chance on held-out documents."""
    paths = {}
    for split, (lines, seed) in {"train": (300, 0), "validation": (40, 1)}.items():
        folder = tmp_path / split
        folder.mkdir()
        for i, text in enumerate(synthetic.topic_documents(8, lines, seed)):
            (folder / f"{i}.txt").write_text(text + "\n")
        paths[split] = ",".join(str(p) for p in sorted(folder.iterdir()))
    result = run_experiment(
        "bert-tiny-mlm", tmp_path / "run", f"train_files=[{paths['train']}]",
        f"validation_files=[{paths['validation']}]", "steps=500", "log_every=100", "batch_size=32", "seq_length=64",
        "learning_rate=1e-3", "eval_batches=8", "model.d_model=64", "model.num_heads=4", "model.d_ff=128",
        "model.dropout_rate=0", "model.attention_dropout_rate=0",
    )
    assert result.validation["nsp_accuracy"] > 0.75, result.validation


def test_pretraining_learns_sentence_order_where_order_shows(tmp_path):
    """Where the order of two segments shows in their words (each document's first line opens
    with "alpha", its second with "omega"), sentence-order pretraining learns it on held-out
    documents: the swapped pairs reach the pair head with their labels."""
    words = synthetic.sentences(400, seed=3)
    paths = {}
    for split, (count, offset) in {"train": (150, 0), "validation": (40, 300)}.items():
        paths[split] = tmp_path / f"{split}.jsonl"
        documents = [{"text": f"alpha {words[offset + 2 * i]}\nomega {words[offset + 2 * i + 1]}"} for i in range(count)]
        paths[split].write_text("".join(json.dumps(d) + "\n" for d in documents))
    result = run_experiment(  # rows of 20 tokens: each line (5+ tokens) a segment of its own
        "albert-tiny-sop", tmp_path / "run", f"train_files=[{paths['train']}]", f"validation_files=[{paths['validation']}]",
        "file_format=jsonl", "steps=200", "log_every=50", "batch_size=32", "seq_length=20", "learning_rate=2e-3",
        "eval_batches=4",
    )
    assert result.validation["nsp_accuracy"] > 0.9, result.validation


def test_text_to_text_learns_labels_written_as_words(tmp_path):
    """Where the label shows in the words (each text opens with its class's word), the
    text-to-text task learns to write the label's name: exact match of the greedy output well
    above the majority's share on held-out texts."""
    words = synthetic.sentences(600, seed=5)
    paths = {}
    for split, (count, offset) in {"train": (400, 0), "validation": (60, 500)}.items():
        paths[split] = tmp_path / f"{split}.jsonl"
        labels = ["calm" if (i * 7) % 3 else "storm" for i in range(count)]  # 2 to 1
        rows = [{"text": f"{label[:2]}ka {words[offset + i]}", "label": label} for i, label in enumerate(labels)]
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_experiment(
        "t5-tiny-sentiment", tmp_path / "run", "init_from=", f"train_files=[{paths['train']}]",
        f"validation_files=[{paths['validation']}]", "file_format=jsonl", "steps=150", "log_every=50",
        "seq_length=6", "eval_every=150", "learning_rate=3e-3", "batch_size=32", "eval_batches=0", "model.dropout_rate=0",
        "model.attention_dropout_rate=0",
        "model.feed_forward_dropout_rate=0",
    )
    assert result.baselines["majority_exact_match"] == pytest.approx(40 / 60)
    assert result.validation["exact_match"] > 0.9, (result.validation, result.sample)
    assert result.sample.endswith(" -> storm") or result.sample.endswith(" -> calm"), result.sample


def test_a_decoder_classifies_text_pairs_by_their_second_text(tmp_path):
    """A decoder-only classifier reads a pair as A [SEP] B [EOS], its head on the last token's state
    (GPT's). Where only the second text tells the label (it opens with the class's word) and the
    first is longer than the row, the first is cut, not the second: held-out accuracy near 1."""
    words = synthetic.sentences(1300, seed=6)
    paths = {}
    for split, (count, offset) in {"train": (500, 0), "validation": (60, 1100)}.items():
        paths[split] = tmp_path / f"{split}.jsonl"
        labels = ["calm" if (i * 7) % 3 else "storm" for i in range(count)]  # 2 to 1
        rows = [{"text": f"{words[offset + 2 * i]} {words[offset + 2 * i + 1]}", "text_pair": f"{label[:2]}ka "
                 f"{words[offset + 2 * i + 2]}", "label": label} for i, label in enumerate(labels)]
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_experiment(
        "gpt-quick-sentiment", tmp_path / "run", "init_from=", "task=pair_classification",
        f"train_files=[{paths['train']}]", f"validation_files=[{paths['validation']}]", "file_format=jsonl",
        "steps=150", "log_every=50", "seq_length=20", "learning_rate=3e-3", "batch_size=32", "eval_batches=0",
        "model.dropout_rate=0", "model.attention_dropout_rate=0",
    )
    assert json.loads((result.run_dir / "labels.json").read_text()) == ["calm", "storm"]
    assert result.baselines["majority_accuracy"] == pytest.approx(40 / 60)
    assert result.validation["accuracy"] > 0.9, result.validation


def _squad_file(path, count: int, seed: int) -> None:
    """SQuAD JSON of synthetic paragraphs: filler sentences and, at a random place among them,
    one fact, "zorbel <word>."; the question asks for it, the answer the word. The paragraphs run
    past a window, so the answer is in any of a paragraph's windows."""
    rng = np.random.default_rng(seed)
    fillers = iter(synthetic.sentences(4 * count, seed))
    values = [w.strip(".").lower() for w in " ".join(synthetic.sentences(300, 77)).split() if len(w) > 3]
    paragraphs = []
    for i in range(count):
        answer = str(rng.choice(values))
        sentences = [next(fillers) for _ in range(4)]
        sentences.insert(int(rng.integers(5)), f"zorbel {answer}.")
        context = " ".join(sentences)
        start = context.index("zorbel ") + len("zorbel ")
        paragraphs.append({"context": context, "qas": [{"id": str(i), "question": "which zorbel?",
                                                       "answers": [{"text": answer, "answer_start": start}]}]})
    path.write_text(json.dumps({"data": [{"title": "synthetic", "paragraphs": paragraphs}]}))


def test_question_answering_learns_to_find_answers_across_windows(tmp_path):
    """Extractive QA over windows of paragraphs longer than one row, trained from scratch:
    held-out exact match near 1 (answers read back as the context's words), well above
    answering with the sentence that shares the most words with the question (which finds the
    fact, but answers its whole sentence)."""
    paths = {split: tmp_path / f"{split}.json" for split in ("train", "validation")}
    _squad_file(paths["train"], 600, seed=0)
    _squad_file(paths["validation"], 60, seed=1)
    result = run_experiment(
        "minilm-squad", tmp_path / "run", "init_from=", f"train_files=[{paths['train']}]",
        f"validation_files=[{paths['validation']}]", "file_format=squad", "seq_length=40", "doc_stride=16",
        "max_question_length=8", "model.num_encoder_layers=2", "model.position=rope", "steps=150", "log_every=50",
        "eval_every=150", "batch_size=32", "learning_rate=3e-3", "warmup_steps=20", "eval_batches=0",
        "model.dropout_rate=0", "model.attention_dropout_rate=0",
    )
    assert result.baselines["overlap_sentence_exact_match"] == 0.0, result.baselines
    assert result.validation["exact_match"] > 0.9, (result.validation, result.sample)
    assert result.validation["f1"] > result.baselines["overlap_sentence_f1"] + 0.2


def _tagged_sentences(count: int, seed: int) -> str:
    """CoNLL text: filler sentences where a name after "mr" is a person (B-PER I-PER) and a word
    after "in" a place (B-LOC), and the same names and places also stand alone, untagged: only
    the context tells, so tagging each word as it was tagged most often scores poorly."""
    rng = np.random.default_rng(seed)
    fillers = synthetic.sentences(count, seed)
    names = [w for w in dict.fromkeys(" ".join(synthetic.sentences(400, 99)).lower().split()) if len(w) > 4][:60]
    lines = []
    for filler in fillers:
        words = [(w, "O") for w in filler.rstrip(".").split()]
        first, last, place = (names[i] for i in rng.integers(len(names), size=3))
        entity = ([("mr", "O"), (first, "B-PER"), (last, "I-PER")] if rng.random() < 0.5
                  else [(first, "O"), (last, "O")])
        entity += [("in", "O"), (place, "B-LOC")] if rng.random() < 0.5 else [(place, "O")]
        at = int(rng.integers(len(words) + 1))
        lines += [f"{w} {t}" for w, t in words[:at] + entity + words[at:]] + [""]
    return "\n".join(lines)


def test_token_classification_learns_entities_from_context(tmp_path):
    """Where only the context tells an entity (a name after "mr", a place after "in"; the same
    words untagged elsewhere), token classification learns it: entity F1 on held-out sentences
    well above memorising each word's most frequent tag."""
    paths = {}
    for split, (count, seed) in {"train": (400, 0), "validation": (60, 1)}.items():
        paths[split] = tmp_path / f"{split}.conll"
        paths[split].write_text(_tagged_sentences(count, seed))
    result = run_experiment(
        "bert-tiny-ner", tmp_path / "run", f"train_files=[{paths['train']}]", f"validation_files=[{paths['validation']}]",
        "file_format=conll", "steps=150", "log_every=50", "batch_size=32", "learning_rate=3e-3", "eval_batches=0",
        "model.dropout_rate=0", "model.attention_dropout_rate=0",
    )
    assert json.loads((result.run_dir / "labels.json").read_text()) == ["O", "B-LOC", "B-PER", "I-PER"]
    assert result.baselines["memorised_entity_f1"] < 0.6, result.baselines
    assert result.validation["entity_f1"] > 0.9, (result.validation, result.sample)


@pytest.mark.network
def test_readme_main_job_command_writes_a_run_directory_and_a_sample(tmp_path):
    """The README's main job, shortened: it writes its run directory and a sample, and its
    validation loss falls below the unigram baseline's."""
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^(python -m train)\s+# run the main job", readme, flags=re.MULTILINE)
    assert command, "README must show the main-job command"
    args = command.group(1).split()[1:] + [
        "steps=150", "log_every=50", "eval_every=1000", "eval_batches=4", "batch_size=16", "sample_tokens=16",
    ]
    result = subprocess.run([sys.executable, *args], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^generated: ROMEO:", result.stdout, flags=re.MULTILINE), result.stdout[-2000:]
    assert result.stdout.count("ROMEO:") == 1, result.stdout  # the sample, shown once
    run_dir = tmp_path / config_lib.EXPERIMENTS[config_lib.DEFAULT_EXPERIMENT].run_dir
    assert {"config.yaml", "tokenizer.model", "checkpoints", "metrics.jsonl", "loss.png"} <= {p.name for p in run_dir.iterdir()}
    losses = train_losses(run_dir)
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    baseline = next(r for r in records if r["split"] == "baseline")
    validation = [r for r in records if r["split"] == "validation"][-1]
    # it learned more than which tokens are common: below the context-free (unigram) loss
    assert validation["loss"] < baseline["unigram_loss"] - 0.3, (validation, baseline)
