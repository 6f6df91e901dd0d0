"""policy-server: generation for product traffic and PPO rollouts, hot-reloading policy versions."""
