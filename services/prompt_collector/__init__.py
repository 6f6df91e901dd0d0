"""prompt-collector: prompt intake, validation, de-duplication, PII scrubbing, split by user."""
