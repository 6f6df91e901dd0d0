"""trainer: SFT, RM and PPO runs and the online loop, as jobs."""
