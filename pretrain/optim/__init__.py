"""Optimizers beyond torch.optim's."""
from pretrain.optim.adamw_copies import AdamWWithCopies

__all__ = ["AdamWWithCopies"]
