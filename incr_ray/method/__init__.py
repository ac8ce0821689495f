"""The method's math, free of Ray, DeepSpeed and transformers: the target rule, the losses, the
holdout metrics and the seeded hashing behind every random choice."""
