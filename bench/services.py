"""Benchmarks of the services (issue: five services over gRPC and Kafka).

    .venv/bin/python bench/services.py [--quick] [--name NAME] [--only ppo,reward,feedback]

Needs a Kafka broker and PostgreSQL: `scripts/infra.sh start && source .cache/infra/env` (the
variables RLHF_TEST_KAFKA_BOOTSTRAP and RLHF_TEST_DATABASE_URL). Each service runs as its own OS
process (`rlhf serve NAME`), as in production. Three measurements, each beside its baseline:

1. ppo: a PPO step through the services (prompts from the prompt-collector, rollouts from the
   policy-server, scores from the reward-scorer over gRPC, the new policy published to the
   registry and announced on Kafka after the update) vs the same step in one process
   (PPOTrainer.step with the reward model in memory). Same model, batch and PPO settings.
2. reward: reward-scorer throughput with 64 concurrent clients vs the raw model's batched
   throughput (RewardEngine.score on full batches, in this process).
3. feedback: rankings stored per second into PostgreSQL by the feedback-store (each answer is sent
   after the commit), with 32 concurrent clients.

Writes bench/results/services-<name>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from common import machine_info, summary, thread_env  # noqa: E402

KAFKA = os.environ.get("RLHF_TEST_KAFKA_BOOTSTRAP")
DB = os.environ.get("RLHF_TEST_DATABASE_URL")


# -- shared set-up --------------------------------------------------------------------------------


def texts(n: int = 2000) -> list[str]:
    """Movie-review-like text from the shipped IMDB sample when present, else synthetic."""
    from rlhf.judge import default_data_dir, load_imdb

    try:
        rows = load_imdb(default_data_dir())
        return [r.text for r in rows[:n]]
    except Exception:  # noqa: BLE001 - benchmark still runs without the data
        words = "the movie was good bad great dull fun and acting plot story film really not very".split()
        return [" ".join(words[(i * 7 + j * 5) % len(words)] for j in range(40)) for i in range(n)]


def build_registry(root: Path, quick: bool) -> tuple:
    """A registry with a demo-shaped random policy and a reward model on its trunk."""
    import torch

    from rlhf.models import RewardModel, TinyLMConfig, build_tiny_lm, save_pretrained, train_tokenizer
    from rlhf.registry import ModelRegistry

    torch.manual_seed(0)
    corpus = texts()
    tok = train_tokenizer(corpus, vocab_size=1024 if quick else 4096)
    shape = TinyLMConfig(n_layer=1, n_embd=64, n_head=2, n_positions=128, vocab_size=len(tok)) if quick else \
        TinyLMConfig(n_layer=4, n_embd=256, n_head=4, n_positions=128, vocab_size=len(tok))
    policy = build_tiny_lm(shape, seed=0)
    reg = ModelRegistry(root)
    reg.publish("policy", lambda d: save_pretrained(policy, tok, d), config={"add_bos": True}, base_model="bench")
    rm = RewardModel.from_causal_lm(build_tiny_lm(shape, seed=1), tok)
    reg.publish("reward", lambda d: rm.save(d), base_model="bench")
    prompts = [" ".join(t.split()[:8]) for t in corpus[:256]]
    return reg, shape, prompts


class Cluster:
    """Services as OS processes (`rlhf serve`), stopped with SIGTERM."""

    def __init__(self, names: list[str], registry: Path, db_url: str | None, threads: int, workdir: Path,
                 extra_env: dict[str, str] | None = None):
        from tests.services.helpers import free_ports

        self.names = names
        ports = free_ports(2 * len(names))
        self.grpc = dict(zip(names, ports[: len(names)]))
        self.metrics = dict(zip(names, ports[len(names):]))
        self.addrs = {n: f"127.0.0.1:{p}" for n, p in self.grpc.items()}
        self.procs = {}
        for n in names:
            pre = "RLHF_" + n.upper().replace("-", "_") + "_"
            env = {**thread_env(threads), "PYTHONPATH": str(ROOT),
                   pre + "PORT": str(self.grpc[n]), pre + "METRICS_PORT": str(self.metrics[n]),
                   pre + "KAFKA_BOOTSTRAP": KAFKA or "", pre + "LOG_LEVEL": "WARNING",
                   pre + "MAX_QUEUE": "4096",
                   pre + "ALLOW_ANONYMOUS": "true",  # loopback only; docs/security.md
                   **(extra_env or {})}
            if n in ("prompt-collector", "feedback-store"):
                env[pre + "DATABASE_URL"] = db_url
            else:
                env[pre + "REGISTRY_DIR"] = str(registry)
            if n == "trainer":
                for peer in ("prompt-collector", "policy-server", "reward-scorer", "feedback-store"):
                    env[pre + peer.upper().replace("-", "_") + "_ADDR"] = self.addrs.get(peer, "127.0.0.1:1")
            log = open(workdir / f"{n}.log", "w")
            self.procs[n] = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "serve", n], env=env, cwd=ROOT,
                                             stdout=log, stderr=subprocess.STDOUT)
        from tests.services.helpers import wait_serving

        for n in names:
            wait_serving(self.addrs[n], timeout=300)

    def close(self) -> None:
        for p in self.procs.values():
            p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()


def fresh_database() -> str:
    from tests.services.helpers import fresh_database as create

    return create(DB, prefix="rlhf_bench")


# -- 1. PPO step: through the services vs in one process ------------------------------------------------


def bench_ppo(work: Path, quick: bool, threads: int) -> dict:
    import grpc
    import torch
    from rlhf_client import prompts_grpc, prompts_pb2, trainer_grpc, trainer_pb2

    from rlhf.algos.ppo import PPOConfig, PPOTrainer
    from rlhf.generation import SamplingParams
    from rlhf.models import RewardModel, load_causal_lm, load_tokenizer

    steps, rounds = (2, 1) if quick else (4, 3)
    batch, mb, epochs, new_tokens = (4, 2, 1, 8) if quick else (16, 8, 4, 24)
    reg, shape, prompts = build_registry(work / "registry", quick)
    cfg = dict(batch_size=batch, mini_batch_size=mb, ppo_epochs=epochs, lr=1e-5,
               sampling=SamplingParams(max_new_tokens=new_tokens))

    torch.set_num_threads(threads)
    pv, rv = reg.latest("policy"), reg.latest("reward")
    tok = load_tokenizer(reg.path("policy", pv))
    rm = RewardModel.load(reg.path("reward", rv)).requires_grad_(False)
    trainer = PPOTrainer(load_causal_lm(reg.path("policy", pv)), tok, lambda p, r: rm.score(p, r), PPOConfig(**cfg),
                         ref_model=load_causal_lm(reg.path("policy", pv)))
    db = fresh_database()
    cl = Cluster(["prompt-collector", "feedback-store", "policy-server", "reward-scorer", "trainer"],
                 work / "registry", db, threads, work)
    with grpc.insecure_channel(cl.addrs["prompt-collector"]) as ch:
        prompts_grpc.PromptCollectorServiceStub(ch).SubmitPrompts(prompts_pb2.SubmitPromptsRequest(prompts=[
            prompts_pb2.PromptInput(text=p.encode(), user_id="bench", source="bench", consent=True)
            for p in dict.fromkeys(prompts)]))

    def in_process(first: int) -> None:
        for i in range(first, first + steps):
            t0 = time.perf_counter()
            m = trainer.step([prompts[(i * batch + j) % len(prompts)] for j in range(batch)])
            local.append(time.perf_counter() - t0)
            local_phases.append({k: v for k, v in m.items() if k.startswith("time_")})

    def through_services(times: list, phase_rows: list, prefetch: bool = False) -> None:
        """One PPO job of steps + 1 steps; its first step (connections, first loads) is not counted."""
        over = {"prefetch_rollouts": str(prefetch).lower(),
                "steps": str(steps + 1), "ppo.batch_size": str(batch), "ppo.mini_batch_size": str(mb),
                "ppo.ppo_epochs": str(epochs), "ppo.lr": "1e-5", "ppo.sampling.max_new_tokens": str(new_tokens),
                "wait_for_serving_seconds": "300"}
        with grpc.insecure_channel(cl.addrs["trainer"]) as ch:
            stub = trainer_grpc.TrainerServiceStub(ch)
            job = stub.StartJob(trainer_pb2.StartJobRequest(kind=trainer_pb2.JOB_KIND_PPO, overrides=over)).job
            marks, phases = [], []
            for ev in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id)):
                if ev.message.startswith("PPO step"):
                    marks.append(ev.metrics["step_duration_seconds"])
                    phases.append({k: v for k, v in ev.metrics.items() if k.startswith("time_")})
            job = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id)).job
        if job.status != trainer_pb2.JOB_STATUS_SUCCEEDED:
            raise RuntimeError(f"PPO job failed: {job.message}")
        times.extend(marks[1:])
        phase_rows.extend(phases[1:])
        (staleness_prefetch if prefetch else staleness).append(job.metrics.get("rollout_staleness_mean_versions"))

    # the two sides alternate, so that drift in the machine's speed hits both alike
    local, local_phases, services, services_phases, staleness = [], [], [], [], []
    prefetched, prefetched_phases, staleness_prefetch = [], [], []
    try:
        trainer.step(prompts[:batch])  # warm-up
        for r in range(rounds):
            in_process(1 + r * steps)
            through_services(services, services_phases)
            through_services(prefetched, prefetched_phases, prefetch=True)
    finally:
        cl.close()
    del trainer
    lm, sm = statistics.median(local), statistics.median(services)

    def medians(rows: list[dict]) -> dict:
        return {k: statistics.median(r.get(k, 0.0) for r in rows) for k in sorted({k for r in rows for k in r})}

    return {"batch_size": batch, "mini_batch_size": mb, "ppo_epochs": epochs, "response_tokens": new_tokens,
            "model": {"n_layer": shape.n_layer, "n_embd": shape.n_embd, "vocab_size": shape.vocab_size},
            "in_process_step_seconds": summary(local), "services_step_seconds": summary(services),
            "services_slower_ratio": sm / lm - 1.0,
            "in_process_phase_seconds": medians(local_phases), "services_phase_seconds": medians(services_phases),
            "rounds": rounds, "staleness_mean_versions": statistics.mean(staleness),
            "prefetch_step_seconds": summary(prefetched),
            "prefetch_slower_ratio": statistics.median(prefetched) / lm - 1.0,
            "prefetch_phase_seconds": medians(prefetched_phases),
            "prefetch_staleness_mean_versions": statistics.mean(staleness_prefetch)}


# -- 2. reward-scorer: 64 concurrent clients vs the raw model -----------------------------------------------


def bench_reward(work: Path, quick: bool, threads: int) -> dict:
    import grpc
    import torch
    from rlhf_client import reward_grpc, reward_pb2

    from rlhf.serving import RewardEngine

    reg, shape, prompts = build_registry(work / "registry-rm", quick)
    rv = reg.latest("reward")
    pairs = [(p, " ".join(p.split()[::-1]) + " and the film") for p in prompts]
    seconds = 3 if quick else 20

    torch.set_num_threads(threads)
    eng = RewardEngine(reg.path("reward", rv), rv)

    def raw_rate(batch: int, secs: float) -> float:
        eng.score(pairs[:batch])
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < secs:
            eng.score([pairs[(n + i) % len(pairs)] for i in range(batch)])
            n += batch
        return n / (time.perf_counter() - t0)

    # the raw model at each batch size; the baseline is the best of them, and the server runs its
    # forward passes at that size (on a CPU large padded batches are slower per pair)
    sweep = {batch: raw_rate(batch, seconds / 4) for batch in (8, 16, 32, 64, 128)}
    batch = max(sweep, key=sweep.get)

    cl = Cluster(["reward-scorer"], work / "registry-rm", None, threads, work,
                 extra_env={"RLHF_REWARD_SCORER_FORWARD_BATCH": str(batch)})
    clients, per_call = 64, 8

    async def load() -> float:
        async with grpc.aio.insecure_channel(cl.addrs["reward-scorer"]) as ch:
            stub = reward_grpc.RewardServiceStub(ch)
            done = 0
            stop_at = time.perf_counter() + seconds

            async def client(c: int) -> None:
                nonlocal done
                i = c
                while time.perf_counter() < stop_at:
                    items = [reward_pb2.ScoreItem(prompt=pairs[(i + j) % len(pairs)][0],
                                                  response=pairs[(i + j) % len(pairs)][1]) for j in range(per_call)]
                    await stub.Score(reward_pb2.ScoreRequest(items=items))
                    done += per_call
                    i += clients

            await stub.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt="a", response="b")]))
            t0 = time.perf_counter()
            await asyncio.gather(*(client(c) for c in range(clients)))
            return done / (time.perf_counter() - t0)

    # raw and served alternate (the server idles while the raw model runs), so that drift in the
    # machine's speed hits both sides alike; the ratio is the median of the rounds' ratios
    raws, serveds = [], []
    try:
        for _ in range(1 if quick else 3):
            raws.append(raw_rate(batch, seconds / 2))
            serveds.append(asyncio.run(load()))
    finally:
        cl.close()
    del eng
    ratios = [s_ / r_ for s_, r_ in zip(serveds, raws)]
    return {"raw_pairs_per_second": statistics.median(raws), "raw_batch": batch,
            "raw_pairs_per_second_by_batch": sweep, "served_pairs_per_second": statistics.median(serveds),
            "raw_rounds": raws, "served_rounds": serveds, "served_vs_raw_rounds": ratios,
            "clients": clients, "pairs_per_call": per_call, "served_vs_raw": statistics.median(ratios)}


# -- 3. feedback-store: rankings per second into PostgreSQL ---------------------------------------------


def bench_feedback(work: Path, quick: bool, threads: int) -> dict:
    import grpc
    from rlhf_client import feedback_grpc, feedback_pb2
    from sqlalchemy import text

    from rlhf.storage.db import make_engine

    db = fresh_database()
    cl = Cluster(["feedback-store"], work, db, threads, work)
    n_tasks = 200 if quick else 3000
    clients = 32

    async def run() -> tuple[int, float]:
        async with grpc.aio.insecure_channel(cl.addrs["feedback-store"]) as ch:
            stub = feedback_grpc.FeedbackServiceStub(ch)
            tasks = []
            for i in range(0, n_tasks, 500):
                r = await stub.CreateLabelingTasks(feedback_pb2.CreateLabelingTasksRequest(tasks=[
                    feedback_pb2.LabelingTaskInput(prompt=f"prompt {j}", prompt_id=str(j), split=1,
                                                   candidates=["a", "b", "c", "d"], policy_version="v")
                    for j in range(i, min(n_tasks, i + 500))]))
                tasks += [t.task_id for t in r.tasks]
            queue = list(tasks)

            async def client() -> int:
                n = 0
                while queue:
                    tid = queue.pop()
                    await stub.SubmitRanking(feedback_pb2.SubmitRankingRequest(
                        idempotency_key=uuid.uuid4().hex, task_id=tid, labeler_id="bench",
                        ranking=[feedback_pb2.RankGroup(indices=[k]) for k in (2, 0, 3, 1)]))
                    n += 1
                return n

            t0 = time.perf_counter()
            counts = await asyncio.gather(*(client() for _ in range(clients)))
            return sum(counts), time.perf_counter() - t0

    try:
        n, dt = asyncio.run(run())
        time.sleep(2)  # let the outbox relay publish what is left
    finally:
        cl.close()
    eng = make_engine(db)
    with eng.connect() as c:
        stored = c.execute(text("select count(*) from submissions where kind = 'ranking'")).scalar()
        unpublished = c.execute(text("select count(*) from outbox where published_at is null")).scalar()
    eng.dispose()
    return {"rankings": n, "clients": clients, "seconds": dt, "rankings_per_second": n / dt,
            "stored": stored, "outbox_unpublished_after_2s": unpublished}


def to_markdown(res: dict) -> str:
    m = res["machine"]
    out = [f"# Services benchmark `{res['name']}`", "",
           f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores, torch {m['torch']}, {res['threads']} threads per process; "
           f"command: `{res['command']}`", ""]
    if "ppo" in res:
        p = res["ppo"]
        out += ["## PPO step: through the services vs in one process", "",
                f"batch {p['batch_size']}, minibatch {p['mini_batch_size']}, {p['ppo_epochs']} epochs, "
                f"{p['response_tokens']} response tokens, model {p['model']}", "",
                "| | median s/step | min | max | n |", "|---|---|---|---|---|",
                *[f"| {k} | {p[k + '_step_seconds']['median']:.3f} | {p[k + '_step_seconds']['min']:.3f} | "
                  f"{p[k + '_step_seconds']['max']:.3f} | {p[k + '_step_seconds']['n']} |" for k in ("in_process", "services")],
                "", f"services slower by **{100 * p['services_slower_ratio']:.1f} %** (target <= 10 %); "
                f"{p.get('rounds', 1)} alternating rounds; rollout staleness {p['staleness_mean_versions']:.2f} versions on average", "",
                f"With `prefetch_rollouts` (the next rollouts generated during the update): median "
                f"{p['prefetch_step_seconds']['median']:.3f} s/step (min {p['prefetch_step_seconds']['min']:.3f}, max "
                f"{p['prefetch_step_seconds']['max']:.3f}), **{100 * p['prefetch_slower_ratio']:+.1f} %** against in process; "
                f"staleness {p['prefetch_staleness_mean_versions']:.2f} versions", "",
                "Where a step's time goes (median seconds; the services' figures are the trainer's own timers; "
                "`generate` includes the gRPC call to the policy-server, `reward` the call to the reward-scorer):", "",
                "| phase | in process | services |", "|---|---|---|",
                *[f"| {k[5:-8]} | {p['in_process_phase_seconds'].get(k, 0.0):.3f} | {p['services_phase_seconds'].get(k, 0.0):.3f} |"
                  for k in sorted(set(p["in_process_phase_seconds"]) | set(p["services_phase_seconds"]))], ""]
    if "reward" in res:
        r = res["reward"]
        out += ["## reward-scorer: 64 concurrent clients vs the raw model", "",
                "raw model by batch size: " + ", ".join(f"{b}: {v:.0f}" for b, v in r["raw_pairs_per_second_by_batch"].items())
                + f" pairs/s; best: batches of {r['raw_batch']}, {r['raw_pairs_per_second']:.0f} pairs/s; served "
                f"(forward_batch {r['raw_batch']}, {r['clients']} clients x {r['pairs_per_call']} pairs per call): {r['served_pairs_per_second']:.0f} "
                f"pairs/s = **{100 * r['served_vs_raw']:.0f} %** of raw (target >= 90 %; median of "
                f"{len(r['served_vs_raw_rounds'])} alternating rounds: "
                + ", ".join(f"{100 * x:.0f} %" for x in r["served_vs_raw_rounds"]) + ")", ""]
    if "feedback" in res:
        f = res["feedback"]
        out += ["## feedback-store: rankings into PostgreSQL", "",
                f"{f['rankings']} rankings from {f['clients']} concurrent clients in {f['seconds']:.1f} s: "
                f"**{f['rankings_per_second']:.0f} rankings/s**, each acknowledged after its commit "
                f"(stored: {f['stored']}; outbox rows unpublished 2 s after the run: {f['outbox_unpublished_after_2s']})", ""]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--name", default=None)
    ap.add_argument("--only", default="ppo,reward,feedback")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if not (KAFKA and DB):
        print("needs RLHF_TEST_KAFKA_BOOTSTRAP and RLHF_TEST_DATABASE_URL: "
              "scripts/infra.sh start && source .cache/infra/env", file=sys.stderr)
        return 2
    name = a.name or ("services-quick" if a.quick else "services-cpu")
    res = {"name": name, "threads": a.threads, "machine": machine_info("cpu", a.threads),
           "command": "bench/services.py " + " ".join(sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp:
        for part in a.only.split(","):
            fn = {"ppo": bench_ppo, "reward": bench_reward, "feedback": bench_feedback}[part]
            print(f"[bench] {part} ...", file=sys.stderr)
            res[part] = fn(Path(tmp), a.quick, a.threads)
            print(json.dumps(res[part], indent=2), file=sys.stderr)
    out = BENCH / "results"
    (out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{name}.md").write_text(to_markdown(res))
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
