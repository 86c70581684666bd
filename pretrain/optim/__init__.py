"""Optimizers beyond torch.optim's."""
from pretrain.optim.adamw_copies import AdamWWithCopies
from pretrain.optim.state import keep_implementation_on_load

__all__ = ["AdamWWithCopies", "keep_implementation_on_load"]
