"""The services' commands of the `rlhf` command line: ``serve``, ``up``, ``demo-loop`` and ``labelers``.

The core's parser (:mod:`rlhf.cli`) loads :func:`add_commands` through the ``rlhf.commands``
entry point (pyproject.toml), so the core stays importable and usable without the services.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rlhf.cli import progress_display
from rlhf.config import split_override
from rlhf.errors import RLHFError
from services import SERVICES


def cmd_demo_loop(args) -> int:
    from services.loop_demo import run_loop_demo

    out = Path(args.out) if args.out else Path("runs") / time.strftime("loop-%Y%m%d-%H%M%S")
    if out.exists() and any(out.iterdir()):
        raise RLHFError(f"run directory {out} exists and is not empty; pick another --out")
    with progress_display() as progress:
        s = run_loop_demo(out, quick=args.quick, data_dir=Path(args.data) if args.data else None,
                          base_port=args.base_port, progress=progress, base_metrics_port=args.base_metrics_port,
                          http_port=args.http_port, linger_seconds=args.linger, model=args.model,
                          overrides=dict(split_override(kv) for kv in args.set))
    print(f"online loop through the services: {s['iterations']} iteration(s), {s['comparisons_stored']} comparisons "
          f"stored (labelers agree on {s['labeler_agreement']:.3f} of pairs), {len(s['versions_published'])} versions published")
    print(f"policy {s['policy_version_first']} -> {s['policy_version_last']} (served: {s['policy_version_served']})")
    print(f"gold score {s['gold_score_first']:.3f} -> {s['gold_score_last']:.3f}; win rate last vs first "
          f"{s['win_rate_last_vs_first']:.3f}; wall {s['wall_seconds']:.0f} s; {out / 'summary.json'}")
    return 0


def cmd_serve(args) -> int:
    from rlhf.runtime.threads import prepare_process

    prepare_process()  # before torch is imported: one intra-op thread team, the model thread's
    from services.launch import serve_one

    serve_one(args.name)
    return 0


def cmd_up(args) -> int:
    import asyncio

    from rlhf.runtime.threads import prepare_process

    prepare_process()  # before torch is imported: intra-op threads only on the services' model threads

    from services.launch import UpOptions, up

    opts = UpOptions(data_dir=Path(args.data_dir), host=args.host, base_port=args.base_port,
                     base_metrics_port=args.base_metrics_port, http_port=args.http_port,
                     labeling_port=args.labeling_port, kafka=args.kafka, database_url=args.database_url,
                     log_level=args.log_level, announce=True)
    if args.policy:
        from rlhf.model_import import import_model

        import_model(args.policy, opts.data_dir / "registry")
    asyncio.run(up(opts))
    return 0


def cmd_labelers(args) -> int:
    """Labeler accounts on a running feedback-store (its operator RPCs)."""
    import os

    import grpc
    from rlhf_client.channel import Credentials
    from rlhf_client.client import FeedbackClient

    from rlhf.runtime.auth import read_secret

    if args.action != "list" and not args.name:
        raise RLHFError(f"rlhf labelers {args.action} needs the labeler's name")
    token = read_secret(args.token_file) if args.token_file else os.environ.get("RLHF_TOKEN", "")
    ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    try:
        return _labelers(args, FeedbackClient(args.addr, Credentials(token=token, ca=ca), timeout=30))
    except grpc.RpcError as e:
        raise RLHFError(f"the feedback-store at {args.addr} answered {e.code().name}: {e.details()}") from None


def _labelers(args, client) -> int:
    with client as fb:
        if args.action == "create":
            r = fb.create_labeler(args.name, admin=args.admin)
            print(f"{'admin' if args.admin else 'labeler'} {r.labeler.name} created; sign-in token (shown once, "
                  f"keep it secret):", file=sys.stderr)
            print(r.token)
        elif args.action == "token":
            token = fb.issue_labeler_token(args.name)
            print(f"new sign-in token for {args.name} (their previous one no longer works):", file=sys.stderr)
            print(token)
        elif args.action == "revoke":
            print(f"{args.name} revoked; {fb.revoke_labeler(args.name)} open task(s) moved to other labelers")
        elif args.action == "reassign":
            print(f"{fb.reassign_labeler_tasks(args.name)} open task(s) of {args.name} moved to other labelers")
        else:
            print(f"{'name':24} {'role':8} {'state':12} {'rankings':>8} {'best-of-K':>9} {'demos':>6} {'skips':>6} "
                  f"{'open':>5} {'median s':>8}")
            for x in fb.labelers():
                state = ("active" if x.active else "revoked") if x.registered else "unregistered"
                print(f"{x.name:24} {'admin' if x.admin else 'labeler':8} {state:12} {x.rankings:>8} {x.best_of_k:>9} "
                      f"{x.demonstrations:>6} {x.skips:>6} {x.open_tasks:>5} {x.median_seconds_per_task:>8.1f}")
    return 0


def add_commands(sub) -> None:
    """Add ``demo-loop``, ``serve`` and ``up`` to the `rlhf` sub-parsers ``sub``."""
    dl = sub.add_parser("demo-loop", help="the online loop through the five services (embedded: SQLite, in-process bus)")
    dl.add_argument("--quick", action="store_true", help="smoke-test budget")
    dl.add_argument("--out", help="run directory (default: runs/loop-<timestamp>)")
    dl.add_argument("--data", help="data directory holding imdb-sample/ and rt-polarity/")
    dl.add_argument("--base-port", type=int, default=50051, help="gRPC ports base..base+4")
    dl.add_argument("--base-metrics-port", type=int, default=0,
                    help="Prometheus ports, same offsets as the gRPC ports (as rlhf up); 0: none")
    dl.add_argument("--http-port", type=int, default=0, help="the policy-server's HTTP API; 0: a free port, -1: none")
    dl.add_argument("--linger", type=float, default=0.0, metavar="SECONDS",
                    help="keep the services up this long after the loop (Ctrl-C ends the wait)")
    dl.add_argument("--model", default="tiny",
                    help="tiny (the demo's GPT-2) or a real model as rlhf import-model takes it, e.g. smollm2")
    dl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of the online-loop job, e.g. ppo.prefetch_rollouts=true (the trainer "
                         "refuses unknown keys)")
    dl.set_defaults(func=cmd_demo_loop)

    sv = sub.add_parser("serve", help="run one service (settings from RLHF_<SERVICE>_* environment variables)")
    sv.add_argument("name", choices=sorted(SERVICES))
    sv.set_defaults(func=cmd_serve)

    u = sub.add_parser("up", help="every service on this machine (SQLite and an in-process bus by default)")
    u.add_argument("--data-dir", default=".rlhf", help="model registry and SQLite database (default .rlhf)")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--base-port", type=int, default=50051,
                   help="gRPC ports: prompt-collector +0, policy-server +1, reward-scorer +2, feedback-store +3, trainer +4")
    u.add_argument("--base-metrics-port", type=int, default=9101, help="Prometheus ports, same offsets; 0: none")
    u.add_argument("--http-port", type=int, default=8000,
                   help="the policy-server's OpenAI/TGI-compatible HTTP API; 0: a free port (logged), -1: none")
    u.add_argument("--labeling-port", type=int, default=8001,
                   help="the feedback-store's labeling page; 0: a free port (logged), -1: none")
    u.add_argument("--kafka", help="Kafka bootstrap servers; default: an in-process bus")
    u.add_argument("--database-url", help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db; default: SQLite in --data-dir")
    u.add_argument("--policy", help="a model to serve first, imported into the registry as `rlhf import-model` does: "
                                    "a Hugging Face directory, a GGUF file or an installed model package (smollm2)")
    u.add_argument("--log-level", default="INFO")
    u.set_defaults(func=cmd_up)

    lb = sub.add_parser("labelers", help="labeler accounts of a running feedback-store: create, token, revoke, "
                                         "reassign, list (operators)")
    lb.add_argument("action", choices=["create", "token", "revoke", "reassign", "list"],
                    help="create NAME: register and print a sign-in token; token NAME: a new token (the old one stops "
                         "working); revoke NAME: disable and move their open tasks; reassign NAME: move their open "
                         "tasks; list: everyone with their counts")
    lb.add_argument("name", nargs="?", default="", help="the labeler (1..64 letters, digits, '.', '_', '-', '@')")
    lb.add_argument("--admin", action="store_true", help="create: an admin account (the page's admin view), not a labeler")
    lb.add_argument("--addr", default="127.0.0.1:50054", help="the feedback-store's gRPC address (default: rlhf up's)")
    lb.add_argument("--token-file", help="a file holding your operator token (default: $RLHF_TOKEN; none with "
                                         "rlhf up on loopback)")
    lb.add_argument("--tls-ca", help="PEM CA bundle when the feedback-store serves TLS")
    lb.set_defaults(func=cmd_labelers)
