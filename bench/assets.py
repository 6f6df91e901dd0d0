"""Build what both sides load: tokenizer, policy, a fixed reward model, prompts and comparisons.

Runs in our environment (it uses ``rlhf`` to train the tokenizer and build the policy) and writes a
directory that the trl side reads with plain ``transformers``:

    tokenizer/        the byte-level BPE trained on the IMDB sample (rlhf.models.train_tokenizer)
    policy/           rlhf.models.build_tiny_lm(...) saved in Hugging Face format (+ tokenizer)
    reward/           GPT2ForSequenceClassification(num_labels=1), same trunk shape, fitted for a few
                      steps to a fixed rule (see below) so that "learns alike" means something
    prompts.json      the first ``prompt_tokens`` tokens of IMDB reviews, as text and ids; only
                      prompts whose text re-tokenizes to exactly those ids are kept, so the text
                      our trainer takes and the ids trl takes are the same tokens
    comparisons.json  K=4 rankings for the reward-model benchmark
    meta.json         the rule's lexicon, the reward model's fit, the workload

The rule ("gold"): the share of the response's words that are among the 1,000 most common words
of the review text, times 5. A random policy scores low on it; a policy that learns to emit
whole common words scores higher. The reward model is fitted by regression to this rule on
synthetic responses (mixtures of common-word tokens and random tokens), half of them re-tokenized
from text (what our text-level reward function sees) and half as raw sampled ids (what trl's
token-level reward call sees), so that it scores both sides' inputs alike.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import re
import sys
import time
from pathlib import Path

from common import REPO_ROOT, Workload, gold_share, load_json, setup_torch, write_json

sys.path.insert(0, str(REPO_ROOT))  # our library from this checkout (installed editable in .venv anyway)

GOLD_SCALE = 5.0
LEXICON_SIZE = 1000


def default_data_dir() -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def assets_key(w: Workload, data_dir: Path) -> str:
    csv = data_dir / "imdb-sample" / "texts.csv"
    h = hashlib.sha256()
    h.update(json.dumps({"shape": w.to_dict()["shape"], "seed": w.seed, "fit": w.reward_fit_steps,
                         "P": w.prompt_tokens, "R": w.response_tokens}, sort_keys=True).encode())
    h.update(str(csv.stat().st_size).encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:12]


def build_assets(w: Workload, data_dir: Path, out: Path) -> Path:
    """Build (or reuse) the assets for workload ``w``; returns their directory."""
    if (out / "meta.json").is_file():
        return out
    torch = setup_torch(w.threads, w.seed)
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from rlhf.judge import load_imdb
    from rlhf.models import TinyLMConfig, build_tiny_lm, count_parameters, save_pretrained, train_tokenizer

    t_start = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    reviews = load_imdb(data_dir)
    texts = [r.text for r in reviews]

    # Tokenizer and policy --------------------------------------------------------------------
    tok = train_tokenizer(texts, w.shape.vocab_size)
    tok.save_pretrained(tmp / "tokenizer")
    V = len(tok)
    s = w.shape
    policy = build_tiny_lm(TinyLMConfig(n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head,
                                        n_positions=s.n_positions, vocab_size=V), seed=w.seed)
    save_pretrained(policy, tok, tmp / "policy")

    # Prompts: exactly P tokens whose text round-trips to the same ids ---------------------------
    P, R = w.prompt_tokens, w.response_tokens
    prompts = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"][:P]
        if len(ids) < P:
            continue
        p = tok.decode(ids)
        if tok(p, add_special_tokens=False)["input_ids"] == ids:
            prompts.append({"text": p, "ids": ids})
    write_json(tmp / "prompts.json", prompts)

    # The rule and its token set -------------------------------------------------------------
    counts = collections.Counter(wd for t in texts for wd in re.findall(r"[a-z]+", t.lower()))
    lexicon = sorted(wd for wd, _ in counts.most_common(LEXICON_SIZE))
    lex = set(lexicon)
    good_ids = [i for i in range(1, V) if (d := tok.decode([i])).startswith(" ") and d[1:].lower() in lex]

    # Reward model: fitted by regression to GOLD_SCALE * gold_share(response) ----------------------
    rng = random.Random(w.seed)
    cfg = GPT2Config(vocab_size=V, n_positions=s.n_positions, n_embd=s.n_embd, n_layer=s.n_layer,
                     n_head=s.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=1,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(w.seed + 1)
    rm = GPT2ForSequenceClassification(cfg).to(w.device)

    def synthetic(n: int):
        rows, targets = [], []
        for _ in range(n):
            prompt = rng.choice(prompts)["ids"]
            mix = rng.random()
            resp = [rng.choice(good_ids) if rng.random() < mix else rng.randrange(1, V) for _ in range(R)]
            text = tok.decode(resp)
            if rng.random() < 0.5:  # as our text-level reward function will tokenize it
                ids = tok(tok.decode(prompt) + text, add_special_tokens=False)["input_ids"][: s.n_positions]
            else:  # as trl passes the sampled ids
                ids = prompt + resp
            rows.append(ids)
            targets.append(GOLD_SCALE * gold_share(text, lex))
        T = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])  # right-padded; the head reads the last non-pad
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
        return ids.to(w.device), mask.to(w.device), torch.tensor(targets, device=w.device)

    opt = torch.optim.AdamW(rm.parameters(), lr=3e-4)
    rm.train()
    losses = []
    for _ in range(w.reward_fit_steps):
        ids, mask, y = synthetic(16)
        loss = torch.nn.functional.mse_loss(rm(input_ids=ids, attention_mask=mask).logits.squeeze(-1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    rm.eval()
    with torch.no_grad():
        ids, mask, y = synthetic(128)
        pred = rm(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        corr = float(torch.corrcoef(torch.stack([pred, y]).float())[0, 1])
    rm.cpu().save_pretrained(tmp / "reward", safe_serialization=True)
    tok.save_pretrained(tmp / "reward")

    # Comparisons for the reward-model benchmark: K=4 review snippets ranked by the rule -----------
    comps = []
    snip = [tok(t, add_special_tokens=False)["input_ids"] for t in texts[:400]]
    snip = [x for x in snip if len(x) >= 16 + 32]
    for i in range(min(300, len(snip) - 4)):
        prompt = tok.decode(snip[i][:16])
        resp = [tok.decode(snip[i + 1 + k][16:48]) for k in range(4)]
        order = sorted(range(4), key=lambda k: (-gold_share(resp[k], lex), k))  # best first, strict
        comps.append({"prompt": prompt, "responses": resp, "ranking": order})
    write_json(tmp / "comparisons.json", comps)

    meta = {
        "workload": w.to_dict(),
        "vocab_size": V,
        "policy_parameters": count_parameters(policy),
        "reward_parameters": count_parameters(rm),
        "prompts": len(prompts),
        "comparisons": len(comps),
        "gold_scale": GOLD_SCALE,
        "lexicon": lexicon,
        "good_token_count": len(good_ids),
        "reward_fit": {"steps": w.reward_fit_steps, "first_loss": losses[0] if losses else None,
                       "last_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
                       "heldout_corr": corr},
        "build_seconds": time.perf_counter() - t_start,
    }
    write_json(tmp / "meta.json", meta)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", required=True, help="workload JSON (written by bench/run.py)")
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    w = Workload.from_dict(load_json(a.workload))
    print(build_assets(w, a.data, a.out))


if __name__ == "__main__":
    main()
