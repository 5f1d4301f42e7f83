"""The LoRA trainer (issue 5)."""
