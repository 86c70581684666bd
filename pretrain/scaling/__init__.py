"""Compute-optimal scaling as the paper ran it: architectures x sizes x FLOP budgets trained to
their budget (`plan`, `run`), then isoFLOP parabolas and the power laws N_opt(C), D_opt(C)
fitted to the final losses (`fit`). `python -m pretrain.scaling plan | run | fit`."""
