"""The BERT encoder, top to bottom in one file.

Reference: Devlin, Chang, Lee, Toutanova. "BERT: Pre-training of Deep Bidirectional Transformers
for Language Understanding", 2018 (arXiv:1810.04805), and Google's TensorFlow reference
`modeling.py`. The Transformer block is the post-LayerNorm one of Vaswani et al. 2017.

Module and attribute names are chosen so that `state_dict()` has exactly Hugging Face's
`BertModel` keys (`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`,
...): a checkpoint moves between the two libraries by renaming nothing. The checkpoint I/O itself
lives in `bertray.model.hf_format`; `BertPreTrainedModel` below only connects a model class to it.

Shape legend: B batch, S sequence length, H hidden size, N attention heads, D head size (H / N).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from bertray.model.config import BertConfig
from bertray.model import hf_format

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,                                          # the paper's GELU, exact (erf) form
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),  # the tanh approximation (GPT-2)
    "relu": F.relu,
}


# Pack a batch when at most this share of its B * S positions are real tokens. Packing costs
# four gathers per layer; on a 2-core CPU (MiniLM, batch 32 x 64, forward and backward) it
# measured 1.05x faster at 95% real tokens, 1.1x at 90%, 1.5x at 50%. Finding the real tokens
# (`nonzero`) waits for the mask on a GPU, once per forward; it was not measured there.
PACK_BELOW_REAL_SHARE = 0.95


@dataclass(frozen=True)
class TokenPacking:
    """Where the real tokens of a padded (B, S) batch sit among its B * S positions.

    Fine-tuning batches are mostly padding (SST-2 at batch 32: 31% real tokens after each batch is
    cut to its longest member), and every dense layer - projections, feed-forward, LayerNorm,
    dropout - works per token. So the encoder runs those on the T real tokens only, as a (T, H)
    matrix, and only attention, which mixes tokens within a sequence, sees the padded (B, S) layout.
    Results at real tokens are the same; padding positions come out as zeros.
    """

    index: torch.Tensor            # (T,) flat positions b * S + s of the real tokens, ascending
    batch: int
    seq_len: int

    @classmethod
    def of(cls, attention_mask: torch.Tensor | None) -> "TokenPacking | None":
        """The packing of a 1 = token, 0 = padding mask, or None where packing would not pay off."""
        if attention_mask is None or torch.compiler.is_compiling():     # data-dependent shapes
            return None
        batch, seq_len = attention_mask.shape
        index = attention_mask.reshape(-1).nonzero().squeeze(1)
        if index.numel() > PACK_BELOW_REAL_SHARE * batch * seq_len:
            return None
        return cls(index, batch, seq_len)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TokenPacking":
        return TokenPacking(self.index.to(device, non_blocking=non_blocking), self.batch, self.seq_len)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (T, ...)."""
        return x.reshape(self.batch * self.seq_len, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, S, ...), zeros at padding."""
        out = x.new_zeros(self.batch * self.seq_len, *x.shape[1:]).index_copy(0, self.index, x)
        return out.view(self.batch, self.seq_len, *x.shape[1:])


@dataclass
class BertModelOutput:
    """What the encoder returns.

    `hidden_states` (only with `output_hidden_states=True`) has num_hidden_layers + 1 entries: the
    embedding output, then every layer's output, as Hugging Face orders them. Indexing (`out[0]`,
    `out[1]`) gives the sequence and pooled outputs so that code written for Hugging Face works.
    """

    last_hidden_state: torch.Tensor                          # (B, S, H)
    pooler_output: torch.Tensor | None                       # (B, H), None without a pooler
    hidden_states: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, index: int) -> torch.Tensor | None:
        return (self.last_hidden_state, self.pooler_output)[index]


class BertEmbeddings(nn.Module):
    """Token + segment + learned position embeddings, then LayerNorm and dropout (paper Figure 2).

    No `padding_idx`: as in Google's reference, the [PAD] embedding is an ordinary trained row
    (padding positions are excluded by the attention mask, not by the embedding).
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        x = self.word_embeddings(input_ids)                                 # (B, S, H)
        # Positions are 0..S-1 for every sequence: slice the table instead of gathering rows.
        x = x + self.position_embeddings.weight[:seq_len]                   # (S, H) broadcast
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]                    # every token is segment A
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention (Vaswani et al. 2017, section 3.2).

    `torch.nn.functional.scaled_dot_product_attention` picks a fused kernel (flash or
    memory-efficient) where the device has one; attention-probability dropout happens inside it.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self.is_causal = config.is_causal

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, packing: TokenPacking | None = None) -> torch.Tensor:
        """`mask` is boolean, True where a query may attend to a key: (B, 1, 1|S, S), or None.
        `x` is (B, S, H), or (T, H) real tokens with their `packing`; the output has x's shape."""
        # (B, S, H) -> (B, N, S, D): split the hidden size into heads. Three separate projections
        # measured faster than one fused (B, S, 3H) projection on CPU (no weight concatenation).
        q, k, v = (proj(x) if packing is None else packing.unpack(proj(x))
                   for proj in (self.query, self.key, self.value))
        batch, seq_len, hidden = q.shape
        q, k, v = (t.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=self.is_causal and mask is None,    # a given mask already holds the causal part
        )                                                                    # (B, N, S, D)
        out = out.transpose(1, 2).reshape(batch, seq_len, hidden)           # (B, S, H)
        return out if packing is None else packing.pack(out)


class BertSelfOutput(nn.Module):
    """Projection of the concatenated heads, dropout, residual, LayerNorm (post-LN)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    """The attention sub-layer: self-attention (`self`) and its output block (`output`)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, packing: TokenPacking | None = None) -> torch.Tensor:
        return self.output(self.self(x, mask, packing), x)


class BertIntermediate(nn.Module):
    """The first half of the position-wise feed-forward network: H -> intermediate, activation."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))                                       # (B, S, I)


class BertOutput(nn.Module):
    """The second half: intermediate -> H, dropout, residual, LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertLayer(nn.Module):
    """One Transformer encoder block: attention sub-layer, then feed-forward sub-layer."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, packing: TokenPacking | None = None) -> torch.Tensor:
        """`x` is (B, S, H), or (T, H) real tokens with their `packing`."""
        x = self.attention(x, mask, packing)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, output_hidden_states: bool = False,
                packing: TokenPacking | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        states = [x] if output_hidden_states else None
        for layer in self.layer:
            x = layer(x, mask, packing)
            if states is not None:
                states.append(x)
        return x, tuple(states) if states is not None else None


class BertPooler(nn.Module):
    """tanh(W h_[CLS] + b): the sentence representation that NSP and classification read."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))                         # (B, H)


def attention_mask_for(attention_mask: torch.Tensor | None, seq_len: int, causal: bool) -> torch.Tensor | None:
    """The boolean mask SDPA wants (True = may attend) from a 1 = token, 0 = padding mask.

    Bidirectional: (B, 1, 1, S), broadcast over heads and queries. Causal with padding: (B, 1, S, S),
    a key is visible if it is a real token and not in the future. Causal without padding: None
    (SDPA's own `is_causal` is cheaper than a materialised triangle).
    """
    if attention_mask is None:
        return None
    keys = attention_mask.to(torch.bool)[:, None, None, :]                  # (B, 1, 1, S)
    if not causal:
        return keys
    past = torch.ones(seq_len, seq_len, dtype=torch.bool, device=keys.device).tril()
    return keys & past                                                       # (B, 1, S, S)


def truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Fill with normal(0, std) restricted to [-2 std, 2 std], in place.

    The same distribution as `torch.nn.init.trunc_normal_(tensor, 0, std, -2 * std, 2 * std)`, drawn
    by inverting the CDF (uniform, then erfinv) in one pass; `trunc_normal_` resamples in a loop,
    which measured about ten times slower (seconds for BERT-base on a CPU).
    """
    edge = math.erf(2 / math.sqrt(2))                        # P(|z| < 2) = 2 Phi(2) - 1
    with torch.no_grad():
        return tensor.uniform_(-edge, edge).erfinv_().mul_(std * math.sqrt(2)).clamp_(-2 * std, 2 * std)


M = TypeVar("M", bound="BertPreTrainedModel")


class BertPreTrainedModel(nn.Module):
    """Base of every bertray BERT model: weight initialisation and Hugging Face checkpoints.

    `save_pretrained` writes `config.json` (with `architectures = [class name]`) and
    `model.safetensors` with Hugging Face's key names; `from_pretrained` reads that layout
    (also `pytorch_model.bin`) with the key rules documented in `hf_format.fit_state_dict`.
    """

    config: BertConfig

    def init_weights(self, module: nn.Module) -> None:
        """Google's initialisation: truncated normal(0, initializer_range) cut at 2 std, zero biases."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            truncated_normal_(module.weight, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write a checkpoint folder that `transformers.<class name>.from_pretrained` also loads."""
        hf_format.save_state_dict(path, self.config, self.state_dict(), architectures=[type(self).__name__])

    @classmethod
    def from_pretrained(cls: type[M], path: str | os.PathLike, config: BertConfig | None = None,
                        **config_overrides: Any) -> M:
        """Build the model from a checkpoint folder and load its weights.

        `config` replaces the folder's `config.json`; `config_overrides` change single keys (for
        example `id2label=...` for a task head or `hidden_dropout_prob=0.0`). Heads the checkpoint
        lacks keep their fresh initialisation. The model is returned in training mode, like any
        new module: call `.eval()` for inference.
        """
        config, tensors = cls._read_checkpoint(path, config, config_overrides)
        model = cls(config)
        hf_format.load_into(model, tensors, source=path)
        return model

    @staticmethod
    def _read_checkpoint(path: str | os.PathLike, config: BertConfig | None,
                         overrides: dict[str, Any]) -> tuple[BertConfig, dict[str, torch.Tensor]]:
        file_config, tensors = hf_format.load_state_dict(path)
        config = config or file_config
        return (config.replace(**overrides) if overrides else config), tensors


class BertModel(BertPreTrainedModel):
    """The bare encoder: embeddings, `num_hidden_layers` Transformer blocks, optional pooler."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(self.init_weights)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False, packing: TokenPacking | bool | None = None) -> BertModelOutput:
        """`input_ids`, `token_type_ids`, `attention_mask`: (B, S); the mask is 1 (or True) for
        real tokens and 0 for padding, in any integer or boolean dtype. A batch that is mostly
        padding runs packed (`TokenPacking`): its outputs are zero at padding positions.

        `packing`: None finds it here from the mask, which on a GPU waits for the mask (a host
        sync); training loops compute it on the host beforehand (`bertray.runtime.batches`) and pass
        it, or False for no packing."""
        mask = attention_mask_for(attention_mask, input_ids.shape[1], self.config.is_causal)
        if packing is None:
            packing = TokenPacking.of(attention_mask)
        elif packing is False or torch.compiler.is_compiling():
            packing = None
        x = self.embeddings(input_ids, token_type_ids)                      # (B, S, H)
        if packing is not None:
            x = packing.pack(x)                                              # (T, H)
        x, states = self.encoder(x, mask, output_hidden_states, packing)
        if packing is not None:                                              # back to (B, S, H)
            states = tuple(map(packing.unpack, states)) if states is not None else None
            x = states[-1] if states is not None else packing.unpack(x)
        pooled = self.pooler(x) if self.pooler is not None else None
        return BertModelOutput(last_hidden_state=x, pooler_output=pooled, hidden_states=states)


__all__ = ["BertModel", "BertModelOutput", "TokenPacking", "BertPreTrainedModel", "BertEmbeddings", "BertSelfAttention",
           "BertAttention", "BertLayer", "BertEncoder", "BertPooler", "attention_mask_for", "ACTIVATIONS"]
