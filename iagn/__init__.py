"""IAGN: Interpretable Attention Guided Network for fine-grained image classification."""

__version__ = "0.1.0"
