"""fastkd: fused knowledge-distillation losses for PyTorch."""
__version__ = "0.1.0"
