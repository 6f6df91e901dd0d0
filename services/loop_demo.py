"""`rlhf demo-loop`: the online loop through the services, on the embedded default.

Every service runs on localhost in this process (SQLite, in-process event bus), exactly as
`rlhf up` starts them. The demo then plays the users around them:

1. the demo's reference policy rho (pre-trained on movie reviews, cached by `rlhf demo`) is
   imported into the model registry as the first policy version;
2. review openings are submitted to the prompt-collector, as product traffic that opted in;
3. two simulated labelers (stand-ins for people; the hidden gold judge of `rlhf demo`, with
   noise calibrated to 73 % agreement) rank the candidates of every labeling task through the
   feedback-store's API;
4. the trainer's online-loop job samples prompts, asks the policy-server for K candidates,
   creates labeling tasks, waits for N comparisons, trains the RM, runs PPO with rollouts from
   the policy-server and scores from the reward-scorer, and publishes each new version, which the
   policy-server and reward-scorer load;
5. the demo compares the first and the last policy version on held-out prompts by the gold judge.

Writes summary.json (versions, figures, wall time) into its run directory.

With ``--model smollm2`` (a real instruction-tuned model, as ``rlhf import-model`` takes it) the
first version is that model, the prompts are the constraint-following task of ``rlhf demo
--model`` (rlhf.constraints; the model's chat template around each), the labelers' hidden taste
is that task's gold judge, the reward model is the MiniLM encoder, and PPO fine-tunes every
weight (LoRA's reference would be the adapted version itself, not the lineage's root, from the
second round on).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from rlhf_client import (feedback_grpc, feedback_pb2, policy_grpc, policy_pb2, prompts_grpc, prompts_pb2,
                         trainer_grpc, trainer_pb2)

from rlhf.demo import (DemoConfig, cache_root, detokenize_rt, prompt_of, quick_config, sample_texts,
                       sentence_prompts)
from rlhf.errors import RLHFError
from rlhf.evaluate import win_rate
from rlhf.judge import GoldJudge, default_data_dir, load_imdb, load_rt_polarity
from rlhf.label_client import run_labeler
from rlhf.labeler import SimulatedLabeler
from rlhf.models import load_causal_lm, load_tokenizer, save_pretrained
from rlhf.progress import Progress
from rlhf.registry import ModelRegistry
from services.launch import PORT_OFFSET, UpOptions, up_in_thread


@dataclass
class LoopDemoConfig:
    iterations: int = 2  # rounds of the online loop
    prompts: int = 1000  # review openings submitted to the prompt-collector
    labelers: int = 2  # simulated labelers ranking every task
    tasks_per_iteration: int = 160  # labeling tasks (prompts x K candidates) per round
    k: int = 4
    response_tokens: int = 24
    eval_prompts: int = 200  # held-out prompts for the before/after comparison
    overrides: dict = field(default_factory=lambda: {
        "rm.rm.lr": "3e-4", "rm.rm.batch_size": "16", "rm.rm.max_length": "64", "rm.rm.bf16": "true",
        "rm.init_from": "policy",
        "ppo.steps": "12", "ppo.ppo.batch_size": "32", "ppo.ppo.mini_batch_size": "8", "ppo.ppo.ppo_epochs": "4",
        "ppo.ppo.lr": "3e-5", "ppo.ppo.kl_coef": "0.15", "ppo.ppo.kl_target": "6.0", "ppo.ppo.bf16": "true",
        "ppo.ppo.max_prompt_tokens": "24", "ppo.eval_every": "4"})


def real_model_overrides(cfg: LoopDemoConfig, quick: bool) -> LoopDemoConfig:
    """The loop's budgets for a real model: chat answers end at EOS (48 new tokens at most), the
    MiniLM reward model, full fine-tuning from the served version, prompts without an added BOS."""
    cfg.response_tokens = 16 if quick else 48
    cfg.overrides.update({
        "rm.model": "minilm", "rm.backbone": "encoder", "rm.rm.lr": "1e-4", "rm.rm.max_length": "256",
        "rm.rm.batch_size": "4" if quick else "8", "ppo.ppo.lr": "3e-6", "ppo.ppo.kl_coef": "0.05",
        "ppo.ppo.kl_target": "4.0", "ppo.ppo.add_bos": "false", "ppo.ppo.max_prompt_tokens": "192",
        "ppo.ppo.finetune": "full", "candidate_min_new_tokens": "1", "ppo.ppo.sampling.min_new_tokens": "0"})
    if not quick:
        cfg.overrides.update({"ppo.steps": "10", "ppo.ppo.batch_size": "16", "ppo.ppo.mini_batch_size": "8",
                              "ppo.ppo.ppo_epochs": "2"})
        cfg.tasks_per_iteration, cfg.eval_prompts, cfg.prompts = 48, 64, 400
    return cfg


def quick_loop_config() -> LoopDemoConfig:
    c = LoopDemoConfig(iterations=1, prompts=64, tasks_per_iteration=8, response_tokens=12, eval_prompts=16)
    c.overrides.update({"ppo.steps": "2", "ppo.ppo.batch_size": "8", "ppo.ppo.mini_batch_size": "4",
                        "ppo.ppo.ppo_epochs": "1", "rm.rm.batch_size": "4", "ppo.eval_prompts": "8"})
    return c


def run_loop_demo(out: Path, quick: bool = False, data_dir: Path | None = None, base_port: int = 50051,
                  progress: Progress | None = None, base_metrics_port: int = 0, http_port: int = 0,
                  linger_seconds: float = 0.0, model: str = "tiny", overrides: dict[str, str] | None = None) -> dict:
    """The online loop through the five services; ``overrides`` are fields of the trainer's
    online-loop job (``ppo.prefetch_rollouts``: ``true``), applied over the loop's own."""
    t_start = time.perf_counter()
    progress = progress or Progress(enabled=False)
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    demo_cfg = quick_config() if quick else DemoConfig()
    cfg = quick_loop_config() if quick else LoopDemoConfig()
    out.mkdir(parents=True, exist_ok=True)
    registry = ModelRegistry(out / "registry")
    if model == "tiny":
        first, judge, prompts, eval_prompts, temperature = _tiny_setup(registry, cfg, demo_cfg, data_dir, progress)
        chat = None
    else:
        cfg = real_model_overrides(cfg, quick)
        first, judge, prompts, eval_prompts, temperature, chat = _real_setup(registry, cfg, model, data_dir, progress)
    cfg.overrides.update(overrides or {})

    opts = UpOptions(data_dir=out, base_port=base_port, base_metrics_port=base_metrics_port, http_port=http_port,
                     log_level="WARNING")
    addr = {n: f"127.0.0.1:{base_port + o}" for n, o in PORT_OFFSET.items()}
    task = progress.add("starting the five services", total=1)
    close = up_in_thread(opts)
    progress.update(task, advance=1)
    stop = threading.Event()
    labelers = []
    try:
        with grpc.insecure_channel(addr["prompt-collector"]) as ch:
            prompts_grpc.PromptCollectorServiceStub(ch).SubmitPrompts(prompts_pb2.SubmitPromptsRequest(prompts=[
                prompts_pb2.PromptInput(text=p.encode(), user_id=f"reader-{i % 97}", source="demo", consent=True)
                for i, p in enumerate(prompts)]), timeout=120)
        for i in range(cfg.labelers):
            lab = SimulatedLabeler(judge, temperature, seed=100 + i)
            th = threading.Thread(target=run_labeler, args=(addr["feedback-store"], lab, f"simulated-{i}", stop),
                                  daemon=True)
            th.start()
            labelers.append(th)
        over = {"iterations": str(cfg.iterations), "prompts_per_iteration": str(cfg.tasks_per_iteration),
                "k": str(cfg.k), "comparisons_needed": str(cfg.tasks_per_iteration * cfg.labelers),
                "candidate_max_new_tokens": str(cfg.response_tokens), "candidate_min_new_tokens": str(cfg.response_tokens),
                "ppo.ppo.sampling.max_new_tokens": str(cfg.response_tokens),
                "ppo.ppo.sampling.min_new_tokens": str(cfg.response_tokens), **cfg.overrides}
        task = progress.add("online loop (trainer job)", total=100)
        with grpc.insecure_channel(addr["trainer"]) as ch:
            stub = trainer_grpc.TrainerServiceStub(ch)
            job = stub.StartJob(trainer_pb2.StartJobRequest(kind=trainer_pb2.JOB_KIND_ONLINE_LOOP, overrides=over)).job
            history = []
            done = 0
            for ev in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id)):
                pct = int(ev.progress * 100)
                progress.update(task, advance=max(0, pct - done), info=ev.message[:70])
                done = max(done, pct)
                if ev.message.startswith("PPO step"):
                    history.append(dict(ev.metrics))
            job = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id)).job
        if job.status != trainer_pb2.JOB_STATUS_SUCCEEDED:
            raise RLHFError(f"the online-loop job ended {trainer_pb2.JobStatus.Name(job.status)}: {job.message}")
        with grpc.insecure_channel(addr["feedback-store"]) as ch:
            fb = feedback_grpc.FeedbackServiceStub(ch)
            agreement = fb.GetAgreement(feedback_pb2.GetAgreementRequest())
            n_comparisons = sum(1 for _ in fb.ExportComparisons(feedback_pb2.ExportComparisonsRequest()))
        with grpc.insecure_channel(addr["policy-server"]) as ch:
            served = policy_grpc.PolicyServiceStub(ch).GetPolicyVersion(policy_pb2.GetPolicyVersionRequest()).policy_version
        if linger_seconds > 0:  # the services stay up for a look at them (their APIs, their /metrics)
            try:
                time.sleep(linger_seconds)
            except KeyboardInterrupt:  # Ctrl-C ends the wait, not the demo
                pass
    finally:
        stop.set()
        for th in labelers:
            th.join(60)
        close()

    # before / after by the gold judge, on held-out prompts
    last = registry.latest("policy")
    task = progress.add("evaluating first vs last policy version (gold judge)", total=2)
    scores = {}
    samples = {}
    for name, v in (("first", first), ("last", last)):
        path = registry.path("policy", v)
        if chat is None:
            g, _ = sample_texts(load_causal_lm(path), load_tokenizer(path), eval_prompts, 1, cfg.response_tokens, seed=7)
        else:
            g = chat(load_causal_lm(path), load_tokenizer(path), eval_prompts, 1, 7)
        samples[name] = [x[0] for x in g]
        scores[name] = judge.score(eval_prompts, samples[name])
        progress.update(task, advance=1)
    summary = {
        "model": model,
        "policy_version_first": first, "policy_version_last": last, "policy_version_served": served,
        "versions_published": list(job.published_versions), "iterations": cfg.iterations,
        "comparisons_stored": n_comparisons, "labeler_agreement": agreement.pairwise_agreement,
        "gold_score_first": float(np.mean(scores["first"])), "gold_score_last": float(np.mean(scores["last"])),
        "win_rate_last_vs_first": win_rate(scores["last"], scores["first"]),
        "job_metrics": dict(job.metrics), "ppo_history": history,
        "wall_seconds": time.perf_counter() - t_start, "registry": str(out / "registry"),
        "samples": [{"prompt": p, "first": a, "last": b} for p, a, b in
                    list(zip(eval_prompts, samples["first"], samples["last"]))[:5]],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _tiny_setup(registry: ModelRegistry, cfg: LoopDemoConfig, demo_cfg: DemoConfig, data_dir: Path, progress: Progress):
    """rho as `rlhf demo` builds and caches it, the positive-continuation judge, review openings."""
    from rlhf.demo import pretrain_reference

    reviews = load_imdb(data_dir)
    train_reviews = [r.text for r in reviews if not r.is_valid]
    valid_reviews = [r.text for r in reviews if r.is_valid]
    rt_texts, _ = load_rt_polarity(data_dir)
    rho, tok, info, rho_path = pretrain_reference(demo_cfg, data_dir, train_reviews + [detokenize_rt(s) for s in rt_texts],
                                                  valid_reviews, progress)
    first = registry.publish("policy", lambda d: save_pretrained(rho, tok, d), base_model=str(rho_path),
                             config={"add_bos": True}, metrics={"valid_perplexity": info["valid_perplexity"]}).version
    # the simulated labelers' hidden taste, calibrated to 73 % agreement on rho's candidates
    judge = GoldJudge.from_data(data_dir, seed=0)
    prompts = sentence_prompts(train_reviews, demo_cfg.prompt_words)[: cfg.prompts]
    grouped, _ = sample_texts(rho, tok, prompts[:64], cfg.k, cfg.response_tokens, seed=1)
    temperature = SimulatedLabeler.calibrate_temperature([judge.score([p] * cfg.k, g) for p, g in zip(prompts, grouped)], 0.73)
    eval_prompts = [prompt_of(t, demo_cfg.prompt_words) for t in valid_reviews][: cfg.eval_prompts]
    return first, judge, prompts, eval_prompts, temperature


def _real_setup(registry: ModelRegistry, cfg: LoopDemoConfig, model: str, data_dir: Path, progress: Progress):
    """The imported model as the first version, the constraint task's train prompts in its chat
    template (test prompts for the evaluation), and its gold judge, which knows the templated
    prompts too (the labelers see what the policy-server was asked)."""
    from rlhf.constraints import ConstraintJudge, attach_constraints, load_instructions, split_tasks
    from rlhf.instruct_demo import InstructDemoConfig, chat_prompt, sample_answers
    from rlhf.model_import import import_model

    task = progress.add(f"import {model} (cached after the first time)", total=1)
    cached = import_model(model, cache_root() / "models" / "registry")
    path = ModelRegistry(cache_root() / "models" / "registry").path("policy", cached.version)
    first = import_model(path, registry.root).version  # a copy of the cached HF directory
    progress.update(task, advance=1)
    tok = load_tokenizer(path)
    splits = split_tasks(attach_constraints(load_instructions(data_dir), seed=0))
    judge = ConstraintJudge.from_data(data_dir, splits["train"] + splits["test"], seed=0)
    for t in splits["train"] + splits["test"]:
        judge.tasks[chat_prompt(tok, t.prompt)] = t
    prompts = [chat_prompt(tok, t.prompt) for t in splits["train"]][: cfg.prompts]
    eval_prompts = [chat_prompt(tok, t.prompt) for t in splits["test"]][: cfg.eval_prompts]
    icfg = InstructDemoConfig(response_tokens=cfg.response_tokens)

    def chat(m, tk, ps, n, seed):
        return sample_answers(m, tk, ps, n, icfg, seed)["texts"]

    grouped = chat(load_causal_lm(path), tok, prompts[:32], cfg.k, 1)
    # answers meeting none of their constraints all score 0: calibrate on the pairs that differ
    temperature = SimulatedLabeler.calibrate_temperature([judge.score([p] * cfg.k, g) for p, g in zip(prompts, grouped)],
                                                         0.73, ignore_ties=True)
    return first, judge, prompts, eval_prompts, temperature, chat
