"""Logical axis names of parameters and activations, and the table mapping them to mesh axes.

Every parameter is created with `nn.with_logical_partitioning(init, names)`; activations at
block boundaries carry `nn.with_logical_constraint`. A training job maps the names to the
axes of a `("data", "fsdp", "tensor")` mesh with `LOGICAL_AXIS_RULES`; without a mesh the
names have no effect.
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
    (KV_HEADS, None),  # replicated: grouped/multi-query attention has fewer K/V heads than devices
    (HEAD_DIM, None),
    (MLP, "tensor"),
    (LAYERS, None),
    (POSITIONS, None),
    (TOKEN_TYPES, None),
    (RELATIVE_BUCKETS, None),
    (LABELS, None),
)
