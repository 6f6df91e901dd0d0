"""Python SDK of the RLHF platform.

The generated messages and stubs live in ``rlhf_client.gen.rlhf.<area>.v1`` (one module per
proto file); this module re-exports them under short names, and :mod:`rlhf_client.client` wraps
the stubs in small typed clients.
"""

from rlhf_client.gen.rlhf.common.v1 import common_pb2
from rlhf_client.gen.rlhf.feedback.v1 import feedback_store_pb2 as feedback_pb2
from rlhf_client.gen.rlhf.feedback.v1 import feedback_store_pb2_grpc as feedback_grpc
from rlhf_client.gen.rlhf.models.v1 import models_pb2
from rlhf_client.gen.rlhf.policy.v1 import policy_server_pb2 as policy_pb2
from rlhf_client.gen.rlhf.policy.v1 import policy_server_pb2_grpc as policy_grpc
from rlhf_client.gen.rlhf.prompts.v1 import prompt_collector_pb2 as prompts_pb2
from rlhf_client.gen.rlhf.prompts.v1 import prompt_collector_pb2_grpc as prompts_grpc
from rlhf_client.gen.rlhf.reward.v1 import reward_scorer_pb2 as reward_pb2
from rlhf_client.gen.rlhf.reward.v1 import reward_scorer_pb2_grpc as reward_grpc
from rlhf_client.gen.rlhf.trainer.v1 import trainer_pb2
from rlhf_client.gen.rlhf.trainer.v1 import trainer_pb2_grpc as trainer_grpc

# Kafka topics: each message is the protobuf message named beside it.
TOPIC_PROMPTS = "rlhf.prompts.v1"  # prompts_pb2.PromptCollectedEvent
TOPIC_FEEDBACK = "rlhf.feedback.v1"  # feedback_pb2.FeedbackEvent
TOPIC_MODELS = "rlhf.models.v1"  # models_pb2.ModelVersionPublishedEvent
TOPIC_SERVING = "rlhf.serving.v1"  # models_pb2.ModelVersionServedEvent

__all__ = [
    "common_pb2", "feedback_pb2", "feedback_grpc", "models_pb2", "policy_pb2", "policy_grpc",
    "prompts_pb2", "prompts_grpc", "reward_pb2", "reward_grpc", "trainer_pb2", "trainer_grpc",
    "TOPIC_PROMPTS", "TOPIC_FEEDBACK", "TOPIC_MODELS", "TOPIC_SERVING",
]
