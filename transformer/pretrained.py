"""Published checkpoints in and out: a local Hugging Face directory as a model of this library.

    loaded = from_pretrained("path/to/gpt2")                  # model, params, tokenizer
    logits = loaded.model.apply({"params": loaded.params}, tokens)
    body = from_pretrained("path/to/all-MiniLM-L6-v2")       # BertModel -> EncoderModel
    save_pretrained(loaded.model, loaded.params, "out/gpt2", tokenizer=loaded.tokenizer)

A directory holds config.json and model.safetensors (or the shards model.safetensors.index.json
lists). The architectures and the rule for every tensor are in `transformer.architectures`; a
tensor no rule reads, a parameter no tensor fills, or an option the library cannot express is
an error naming it. `from_pretrained` also opens this project's own run directories.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from transformer.architectures import (
    ARCHITECTURES, CLASSIFY, ENCODER, LM, MLM, NOT_SUPPORTED, PRETRAINING, TOKEN_CLASSIFY, WRITTEN, Architecture,
    UnsupportedCheckpoint,
)
from transformer.config import ModelConfig
from transformer.decoding import unscanned
from transformer.files import read_json_object, write_atomically
from transformer.models import (
    CausalLM, EncoderModel, MaskedLM, Seq2SeqLM, SequenceClassifier, TokenClassifier, sentence_embedding,
)
from transformer.tokenizer import Tokenizer

# The transformers class a sentencepiece tokenizer is saved for, by family (see SentencePieceTokenizer.save).
SENTENCEPIECE_CLASS = {"bert": "AlbertTokenizer", "gpt2": "LlamaTokenizer", "llama": "LlamaTokenizer", "t5": "T5Tokenizer"}
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
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
    """Opens a Hugging Face checkpoint directory (or a run directory of `python -m train`).

    head: None keeps the checkpoint's own head (config.json `architectures`); "lm", "mlm",
    "pretraining" (MLM + next sentence), "encoder" (the body alone), "classify" or
    "token_classify" put the body under another head; a head the checkpoint lacks is
    initialised from `seed` and listed in `fresh`. num_labels: for a new classifier (default:
    the checkpoint's labels, else 2). dtype: of the parameters and the computation.
    max_length: the context, for models without a position table (T5; default 512).
    """
    path = pathlib.Path(path)
    if (path / "config.yaml").is_file():
        return _from_run(path, head)
    hf = _read_config(path)
    family = ARCHITECTURES[hf["model_type"]]
    config = ModelConfig(**_fields(family, hf, max_length), dtype=dtype, param_dtype=dtype, scan_layers=False)
    tensors = family.split(_read_tensors(path, dtype), config)
    own_head = family.head_of(hf, set(tensors))
    head = own_head if head is None else _check_head(head, family)
    model = _model(config, head, num_labels or len(hf.get("id2label") or {}) or 2)
    abstract = _flat(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *_example(model))["params"]))
    params, fresh = _fill(family.rules(config, head, family.prefix_in(set(tensors))), tensors, abstract, path,
                          may_be_new=head != own_head)
    _check_all_read(family, config, tensors, path)
    if fresh:
        initial = _flat(model.init(jax.random.PRNGKey(seed), *_example(model))["params"])
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
    """The architecture of a Hugging Face checkpoint directory (its config.json), read without the weights."""
    hf = _read_config(pathlib.Path(path))
    return ModelConfig(**_fields(ARCHITECTURES[hf["model_type"]], hf, max_length))


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
    """`head`, or an error when the family's body cannot carry it (an encoder head on GPT-2)."""
    allowed = (MLM, PRETRAINING, ENCODER, CLASSIFY, TOKEN_CLASSIFY) if family.model_type == "bert" else (LM,)
    if head not in allowed:
        raise ValueError(f"head={head!r} does not fit a {family.model_type} checkpoint; choose one of {allowed}.")
    return head


def _model(config: ModelConfig, head: str, num_labels: int) -> nn.Module:
    if head == LM:
        return Seq2SeqLM(config) if config.num_encoder_layers else CausalLM(config)
    return {
        MLM: lambda: MaskedLM(config),
        PRETRAINING: lambda: MaskedLM(config, next_sentence_prediction=True),
        ENCODER: lambda: EncoderModel(config),
        CLASSIFY: lambda: SequenceClassifier(config, num_labels=num_labels),
        TOKEN_CLASSIFY: lambda: TokenClassifier(config, num_labels=num_labels),
    }[head]()


def _example(model: nn.Module) -> tuple[np.ndarray, ...]:
    tokens = np.ones((1, 1), np.int32)
    return (tokens, tokens) if isinstance(model, Seq2SeqLM) else (tokens,)


def _head_of_model(model: nn.Module) -> str:
    if isinstance(model, MaskedLM):
        return PRETRAINING if model.next_sentence_prediction else MLM
    kinds = {CausalLM: LM, Seq2SeqLM: LM, EncoderModel: ENCODER, SequenceClassifier: CLASSIFY,
             TokenClassifier: TOKEN_CLASSIFY}
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


def _read_tensors(path: pathlib.Path, dtype: str) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint (one file, or the index's shards) as a numpy array of `dtype`.

    TensorFlow-era names (LayerNorm.gamma / .beta) are read as .weight / .bias, as transformers does.
    """
    from safetensors import SafetensorError, safe_open

    if (path / INDEX).is_file():
        weight_map = read_json_object(path / INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{path / INDEX} has no weight_map of tensor names to files; download it again.")
        files = sorted(set(weight_map.values()))
    elif (path / WEIGHTS).is_file():
        files = [WEIGHTS]
    elif any(path.glob("pytorch_model*.bin")):
        raise FileNotFoundError(
            f"{path} holds PyTorch pickles (pytorch_model.bin), which are never unpickled here. Convert them "
            "once with transformers: AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)."
        )
    else:
        raise FileNotFoundError(f"{path} has no weights: expected {WEIGHTS} or {INDEX} with its shards.")
    tensors = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"{path / INDEX} lists {name}, which is missing.")
        try:
            with safe_open(file, framework="flax") as opened:  # "flax": bfloat16 too, which numpy lacks
                for key in opened.keys():
                    tensors[_modern_name(key)] = np.asarray(opened.get_tensor(key)).astype(dtype)
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{file} cannot be read ({error}); it is truncated or corrupt. Download or convert it again."
            ) from None
    return tensors


def _modern_name(name: str) -> str:
    """A TensorFlow-era norm tensor's name as transformers writes it now (gamma -> weight, beta -> bias)."""
    return re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name)) if "LayerNorm." in name else name


def _fill(rules, tensors, abstract, path, *, may_be_new: bool) -> tuple[dict[str, np.ndarray], list[str]]:
    """The parameters the rules fill from the tensors, and the ones left to initialise.

    Only a head the checkpoint does not hold (`may_be_new`) and its pooler may be left: a missing
    tensor of the embeddings or a stack is always an error, never a random initialisation.
    """
    rules = [rule for rule in rules if rule.param in abstract]  # a head may lack parts (MaskedLM: no pooler)
    params = {rule.param: rule.to_param(tensors[rule.tensor], abstract[rule.param].shape)
              for rule in rules if rule.tensor in tensors}
    unfilled = sorted(set(abstract) - set(params))
    in_body = [name for name in unfilled if name.split("/")[0] in ("embed", "encoder", "decoder")]
    if in_body or (unfilled and not may_be_new):
        missing = [rule.tensor for rule in rules if rule.param in unfilled] or unfilled
        raise ValueError(f"{path} lacks tensor(s) the model needs: {_names(missing)}.")
    return params, unfilled


def _check_all_read(family, config, tensors, path) -> None:
    """Every tensor is one some head of the family reads, a tied copy, or a buffer; else an error."""
    prefix = family.prefix_in(set(tensors))
    aliases = family.aliases(config, prefix)
    _check_aliases(aliases, tensors, path)
    known = {rule.tensor for head in family.heads for rule in family.rules(config, head, prefix)} | set(aliases)
    unexpected = sorted(name for name in set(tensors) - known if not any(re.fullmatch(p, name) for p in family.ignored))
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
) -> pathlib.Path:
    """Writes config.json and model.safetensors (+ the tokenizer's files) in Hugging Face layout,
    so that `from_pretrained` and `transformers` load the model. Returns the directory.

    label_names: a classifier's labels by id, written as config.json's id2label / label2id
    (default LABEL_0, LABEL_1, ...)."""
    from safetensors.numpy import save_file

    config = model.config
    family, hf = _family_of(config)
    head = _head_of_model(model)
    if head not in family.heads:
        raise UnsupportedCheckpoint(f"A {family.model_type} checkpoint has no {head!r} head in transformers.")
    if family.model_type == "t5" and tokenizer is None:
        raise ValueError("save_pretrained of an encoder-decoder model needs its tokenizer: config.json records "
                         "the decoder start and EOS ids from it.")
    _, variables = unscanned(model, {"params": params})
    flat = {name: np.asarray(value, np.float32) for name, value in _flat(variables["params"]).items()}
    rules = family.rules(config.replace(scan_layers=False), head, family.prefix_for(head))
    tensors = {rule.tensor: np.ascontiguousarray(rule.to_tensor(flat[rule.param]))
               for rule in rules if rule.param in flat}  # a head may lack parts (MaskedLM: no pooler)
    hf |= {"architectures": [family.heads[head]], "torch_dtype": "float32"}
    if head in (CLASSIFY, TOKEN_CLASSIFY):
        hf |= _label_maps(label_names, flat["classifier/kernel"].shape[-1])
    if tokenizer is not None:
        hf |= _config_token_ids(tokenizer, family)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    temporary = path / f"{WEIGHTS}.tmp"
    save_file(family.fuse(tensors), temporary, metadata={"format": "pt"})
    temporary.replace(path / WEIGHTS)
    write_atomically(path / "config.json", json.dumps(hf, indent=2, sort_keys=True) + "\n")
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


def _config_token_ids(tokenizer: Tokenizer, family: type[Architecture]) -> dict[str, int]:
    """config.json's special token ids: the tokenizer's own (none for a token it lacks)."""
    ids = {}
    for key, name in (("pad_token_id", "pad"), ("bos_token_id", "bos"), ("eos_token_id", "eos")):
        if getattr(tokenizer.specials, name) is not None:
            ids[key] = getattr(tokenizer.specials, name)
    if family.model_type == "t5":
        ids["decoder_start_token_id"] = tokenizer.decoder_start_id
    return ids
