"""The platform's gRPC services: one package per service (servicer + settings + Dockerfile).

Services are thin: they translate between protobuf messages and the core library (``rlhf``), and
all of them start through the one bootstrap in :mod:`rlhf.runtime.server` (``rlhf serve NAME``).
"""

# service name (as used by `rlhf serve` and in env variables) -> module with build(settings, metrics)
SERVICES = {
    "prompt-collector": "services.prompt_collector.service",
    "policy-server": "services.policy_server.service",
    "reward-scorer": "services.reward_scorer.service",
    "feedback-store": "services.feedback_store.service",
    "trainer": "services.trainer.service",
}
