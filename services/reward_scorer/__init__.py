"""reward-scorer: batched reward-model scores with dynamic batching across callers."""
