"""fewshot-nsl: few-shot learning with neural similarity learning (NSL)."""

__version__ = "0.1.0"
