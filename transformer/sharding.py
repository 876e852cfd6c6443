"""Logical axis names of parameters and activations, and the table mapping them to mesh axes.

Every parameter is created with `nn.with_logical_partitioning(init, names)`; activations at
block boundaries carry `nn.with_logical_constraint`. A training job maps the names to the
axes of a `("data", "fsdp", "tensor")` mesh with `LOGICAL_AXIS_RULES`, as `axis_rules` adapts
it to the model; without a mesh the names have no effect.
"""

# Parameter axes.
VOCAB = "vocab"
EMBED = "embed"  # the model dimension D
HEADS = "heads"  # query heads N
KV_HEADS = "kv_heads"  # key/value heads K
HEAD_DIM = "head_dim"  # H
MLP = "mlp"  # feed-forward hidden dimension
LAYERS = "layers"  # the stacked axis added by scanning over layers
POSITIONS = "positions"  # rows of a learned position table
TOKEN_TYPES = "token_types"
RELATIVE_BUCKETS = "relative_buckets"
LABELS = "labels"
# Activation axes.
BATCH = "batch"
LENGTH = "length"

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (BATCH, ("data", "fsdp")),
    (LENGTH, None),
    (EMBED, "fsdp"),
    (VOCAB, "tensor"),
    (HEADS, "tensor"),
    (KV_HEADS, None),  # fewer key/value heads than query heads: see `axis_rules`
    (HEAD_DIM, None),
    (MLP, "tensor"),
    (LAYERS, None),
    (POSITIONS, None),
    (TOKEN_TYPES, None),
    (RELATIVE_BUCKETS, None),
    (LABELS, None),
)


def axis_rules(num_kv_heads: int, tensor_shards: int) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """LOGICAL_AXIS_RULES for a model on a mesh of `tensor_shards` "tensor" shards: grouped-query
    key/value heads split over "tensor" as the query heads do where they divide evenly (each
    shard then holds the K/V heads of its own query heads); else (multi-query attention, or
    more shards than K/V heads) every shard keeps them all."""
    kv_axis = "tensor" if num_kv_heads % tensor_shards == 0 else None
    return tuple((name, kv_axis if name == KV_HEADS else axis) for name, axis in LOGICAL_AXIS_RULES)
