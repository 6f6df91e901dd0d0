"""feedback-store (comparison storage): labeling tasks, rankings, best-of-K, demonstrations."""
