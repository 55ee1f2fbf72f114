"""FLOP accounting of a prefill: the model's own (dense) attention vs BlindSight's, and the whole LM.

Attention costs 4 * head_dim FLOPs per kept (query, key) pair and head (2*d for q.k, 2*d for p.v); the
softmax is not counted. Pairs are counted exactly from the layout (``pair_counts``), per category.
The whole language-model prefill adds 2 FLOPs per weight per token for the linear layers of every
decoder layer (q, k, v, o projections and a gated MLP: gate, up, down) and the LM head on the last token
of each row (what ``generate`` computes; ``logits_to_keep=1``). Embeddings and norms are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import hf
from .categories import Category
from .layout import Layout
from .masks import BaseMask
from .masks.block import pair_counts
from .profile import Profile

__all__ = ["AttentionFlops", "attention_flops", "PrefillFlops", "prefill_flops"]


@dataclass(frozen=True)
class AttentionFlops:
    """Attention FLOPs of one prefill, summed over layers, heads and batch rows."""

    dense: int
    blindsight: int
    by_category: dict = field(default_factory=dict)  # Category -> {"heads", "dense", "blindsight"}

    @property
    def reduction(self) -> float:
        """Fraction of the dense attention FLOPs that BlindSight skips."""
        return 1 - self.blindsight / self.dense if self.dense else 0.0

    @property
    def ideal_speedup(self) -> float:
        return self.dense / self.blindsight if self.blindsight else float("inf")


def attention_flops(layout: Layout, profile: Profile, base: BaseMask | None = None) -> AttentionFlops:
    pairs = {c: int(t.sum()) for c, t in pair_counts(layout, list(Category), base).items()}
    per_pair = 4 * profile.model.head_dim
    heads = profile.counts()
    by_category = {
        c: {"heads": heads[c], "dense": heads[c] * pairs[Category.DENSE] * per_pair,
            "blindsight": heads[c] * pairs[c] * per_pair}
        for c in Category
    }
    return AttentionFlops(
        dense=sum(v["dense"] for v in by_category.values()),
        blindsight=sum(v["blindsight"] for v in by_category.values()),
        by_category=by_category,
    )


@dataclass(frozen=True)
class PrefillFlops:
    linear: int
    attention: AttentionFlops

    @property
    def dense(self) -> int:
        return self.linear + self.attention.dense

    @property
    def blindsight(self) -> int:
        return self.linear + self.attention.blindsight

    @property
    def reduction(self) -> float:
        return 1 - self.blindsight / self.dense

    @property
    def ideal_speedup(self) -> float:
        return self.dense / self.blindsight


def prefill_flops(layout: Layout, profile: Profile, config, base: BaseMask | None = None) -> PrefillFlops:
    """Whole language-model prefill FLOPs; ``config`` is a transformers config (VLM or text) or a model."""
    text = hf.text_config(hf.model_config(config))
    m = profile.model
    hidden = text.hidden_size
    per_layer = hidden * m.num_heads * m.head_dim * 2 + 2 * hidden * m.num_kv_heads * m.head_dim
    per_layer += 3 * hidden * text.intermediate_size
    tokens = layout.batch_size * layout.seq_len
    linear = 2 * tokens * per_layer * m.num_layers + 2 * layout.batch_size * hidden * text.vocab_size
    return PrefillFlops(linear=linear, attention=attention_flops(layout, profile, base))
