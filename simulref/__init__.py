"""simulref: reference implementation of LLM simultaneous translation on MLX."""

__version__ = "0.1.0"
