"""evomerge: evolutionary search over merge recipes of fine-tuned LLMs."""

__version__ = "0.1.0"
