"""BERT (Devlin et al. 2018, "BERT: Pre-training of Deep Bidirectional Transformers"), top to bottom in
one file, with transformers' module and parameter names (models/bert/modeling_bert.py), so a
transformers BertModel's state dict loads into ours unchanged and the two give the same outputs.

    tokens -> BertEmbeddings (word + position + token type, LayerNorm)          (B, T) -> (B, T, C)
           -> BertEncoder: L x BertLayer (bidirectional self-attention, FFN; post-norm)
           -> sequence output (B, T, C): one vector per character -> the tagging head
           -> BertPooler: tanh(dense(h[CLS]))                                    (B, C) -> the province head
    pretraining heads: BertLMPredictionHead (masked-LM, decoder tied to the word embeddings) and the
    next-sentence head (2 classes from the pooled [CLS]).

Departures from the famous code are marked where they happen; the one that matters: BERT is post-norm
(LayerNorm *after* each residual add, as in the 2017 Transformer), unlike the pre-norm GPT chapter.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class BertConfig:
    """Sizes of a BERT. Field names are transformers' BertConfig's, so its config.json reads directly."""

    vocab_size: int = 6000  # WordPiece vocabulary (character-level for Chinese)
    hidden_size: int = 256  # C
    num_hidden_layers: int = 4  # L
    num_attention_heads: int = 4  # H; head dim D = C / H
    intermediate_size: int = 1024  # FFN width (4 C, as in BERT)
    hidden_act: str = "gelu"  # BERT's exact (erf) GELU
    hidden_dropout_prob: float = 0.1  # after embeddings, attention output and FFN
    attention_probs_dropout_prob: float = 0.1  # on the attention weights
    max_position_embeddings: int = 128  # learned positions: the longest input
    type_vocab_size: int = 2  # segments A / B (next-sentence prediction)
    layer_norm_eps: float = 1e-12  # BERT's LayerNorm epsilon
    pad_token_id: int = 0
    attn_impl: str = "sdpa"  # sdpa (fused kernel) or math (the equation, for reading and tests)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        """Keep the fields we know (a transformers config.json carries many more)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_hf_dict(self, architecture: str) -> dict:
        """config.json that both our loader and transformers' ``from_pretrained`` read."""
        return {**self.to_dict(), "model_type": "bert", "architectures": [architecture]}


# The model of each named preset (train_mlm.py's --preset starts from it). cpu: trains in minutes on 2 cores.
# gpu4gb: BERT-base widths at 6 layers (fits a 4 GB card in fp16/bf16 with batch 64 x 64 characters).
# full: BERT-base (110 M with a 21 k vocabulary).
MODEL_PRESETS = {
    "cpu": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "gpu4gb": dict(hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072),
    "full": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}

ACT = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


# ---------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------

class BertEmbeddings(nn.Module):
    """e_t = LayerNorm(word[x_t] + position[t] + token_type[s_t]), then dropout (paper, fig. 2).
    Positions are learned vectors, not sinusoids: BERT cannot read past max_position_embeddings."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.max_len = cfg.max_position_embeddings

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.max_len:
            raise ValueError(f"input of {T} tokens; this BERT has {self.max_len} learned positions")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(T, device=input_ids.device)
        e = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.LayerNorm(e))


# ---------------------------------------------------------------------------------------------------
# The encoder layer: attention, then the FFN, each followed by add & LayerNorm (post-norm)
# ---------------------------------------------------------------------------------------------------

class BertSelfAttention(nn.Module):
    """softmax(q k^T / sqrt(D) + mask) v over all positions, both directions; padding keys masked out."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads "
                             f"{cfg.num_attention_heads}")
        self.H, self.D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.p_drop = cfg.attention_probs_dropout_prob
        self.impl = cfg.attn_impl

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (B, T, C); keep (B, T) True on real tokens. Returns the heads concatenated, (B, T, C)."""
        B, T, C = x.shape
        # 1) project and split into heads                            (B, T, C) -> (B, H, T, D)
        q, k, v = (proj(x).view(B, T, self.H, self.D).transpose(1, 2) for proj in (self.query, self.key, self.value))
        mask = keep[:, None, None, :]  # (B, 1, 1, T): every query may look at every real key
        p = self.p_drop if self.training else 0.0
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            # 2) scores q k^T / sqrt(D), padding keys at -inf           (B, H, T, T)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.D)
            scores = scores.masked_fill(~mask, float("-inf"))
            # 3) weights sum to 1 over the keys; dropout on them, as in BERT
            att = F.dropout(scores.softmax(-1), p, self.training)
            out = att @ v
        # 4) concatenate the heads                                  (B, H, T, D) -> (B, T, C)
        return out.transpose(1, 2).reshape(B, T, C)


class BertSelfOutput(nn.Module):
    """LayerNorm(x + dropout(dense(attention)))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(x + self.dropout(self.dense(h)))


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, keep), x)


class BertIntermediate(nn.Module):
    """The FFN's first half: act(dense(x)), C -> 4C."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACT[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertOutput(nn.Module):
    """The FFN's second half with its residual: LayerNorm(x + dropout(dense(h))), 4C -> C."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(x + self.dropout(self.dense(h)))


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, keep)
        return x


class BertPooler(nn.Module):
    """tanh(dense(h_[CLS])): the sentence vector that the classification heads read."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))


class BertModel(nn.Module):
    """ids (B, T) -> (sequence output (B, T, C), pooled [CLS] (B, C))."""

    def __init__(self, cfg: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg) if add_pooling_layer else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        keep = (input_ids != self.config.pad_token_id) if attention_mask is None else attention_mask.bool()
        h = self.encoder(self.embeddings(input_ids, token_type_ids), keep)
        return h, (self.pooler(h) if self.pooler is not None else None)


HF_ONLY = ("embeddings.position_ids", "embeddings.token_type_ids")  # buffers transformers keeps; we compute them


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers BERT checkpoint -> our state dict: the names are the same; only transformers'
    position/token-type id buffers are dropped. Load the result with ``strict=True``."""
    return {k: v for k, v in state.items() if not k.endswith(HF_ONLY)}


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: normal(0, 0.02) for linear and embedding weights, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------------
# Pretraining heads: masked LM (+ next-sentence prediction)
# ---------------------------------------------------------------------------------------------------

class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = ACT[cfg.hidden_act]
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(h)))


class BertLMPredictionHead(nn.Module):
    """logits = LayerNorm(act(dense(h))) E^T + b: the decoder is the word-embedding matrix (tied)."""

    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # tied: one matrix reads and writes characters
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(h)) + self.bias


class BertPreTrainingHeads(nn.Module):
    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg, word_embeddings)
        self.seq_relationship = nn.Linear(cfg.hidden_size, 2)  # is B the sentence that follows A?


class BertForPreTraining(nn.Module):
    """Masked LM over the masked positions, plus (optionally) next-sentence prediction on [CLS]."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg)
        self.cls = BertPreTrainingHeads(cfg, self.bert.embeddings.word_embeddings)
        init_weights(self)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                next_sentence_label: torch.Tensor | None = None) -> dict:
        """labels (B, T): the original id at masked positions, -100 elsewhere (only those are scored)."""
        h, pooled = self.bert(input_ids, attention_mask, token_type_ids)
        out = {"hidden_states": h}
        if labels is not None:  # the vocabulary-wide head runs only where it is scored
            where = labels != -100
            logits = self.cls.predictions(h[where])
            out["mlm_logits"], out["mlm_loss"] = logits, F.cross_entropy(logits, labels[where])
            out["loss"] = out["mlm_loss"]
        else:
            out["mlm_logits"] = self.cls.predictions(h)
        if next_sentence_label is not None:
            nsp_logits = self.cls.seq_relationship(pooled)
            out["nsp_logits"], out["nsp_loss"] = nsp_logits, F.cross_entropy(nsp_logits, next_sentence_label)
            out["loss"] = out.get("loss", 0) + out["nsp_loss"]
        return out


# ---------------------------------------------------------------------------------------------------
# Fine-tuning: one tag per character + the province from [CLS]
# ---------------------------------------------------------------------------------------------------

class BertForAddressParsing(nn.Module):
    """Two heads on one encoder: ``classifier`` (as transformers' BertForTokenClassification) gives a BIOES
    tag to every character; ``province_classifier`` reads the pooled [CLS] (as BertForSequenceClassification)
    and names the province even when the address leaves it out."""

    def __init__(self, cfg: BertConfig, num_tags: int, num_provinces: int, dropout: float = 0.1):
        super().__init__()
        self.config, self.num_tags, self.num_provinces = cfg, num_tags, num_provinces
        self.bert = BertModel(cfg)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cfg.hidden_size, num_tags)
        self.province_classifier = nn.Linear(cfg.hidden_size, num_provinces)
        init_weights(self)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                tags: torch.Tensor | None = None, province: torch.Tensor | None = None,
                province_weight: float = 1.0) -> dict:
        """tags (B, T): tag ids, -100 on [CLS]/[SEP]/padding; province (B,), -100 where unknown.
        loss = CE(tags) + w CE(province)."""
        h, pooled = self.bert(input_ids, attention_mask)
        out = {"tag_logits": self.classifier(self.dropout(h)),
               "province_logits": self.province_classifier(self.dropout(pooled))}
        if tags is not None:
            out["tag_loss"] = F.cross_entropy(out["tag_logits"].flatten(0, 1), tags.flatten(), ignore_index=-100)
            out["loss"] = out["tag_loss"]
        if province is not None:
            out["province_loss"] = F.cross_entropy(out["province_logits"], province, ignore_index=-100)
            out["loss"] = out.get("loss", 0) + province_weight * out["province_loss"]
        return out

    def head_parameters(self) -> list[nn.Parameter]:
        """What a head-only fine-tune trains (the encoder stays frozen)."""
        return [*self.classifier.parameters(), *self.province_classifier.parameters()]
