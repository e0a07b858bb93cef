"""automr: LLM-based generative recommendation with retrieved long-term memory (AutoMR)."""

__version__ = "0.1.0"
