"""pixtral_rt: a GPU inference runtime for Mistral's Pixtral vision-language models."""

__version__ = "0.1.0"
