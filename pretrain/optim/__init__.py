"""Optimizers beyond torch.optim's."""
from pretrain.optim.adamw_copies import AdamWWithCopies
from pretrain.optim.state import initialise_state, keep_implementation_on_load

__all__ = ["AdamWWithCopies", "initialise_state", "keep_implementation_on_load"]
