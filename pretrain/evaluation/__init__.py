"""The paper's analyses over trained checkpoints: validation NLL and bits per byte, loss per token
position past the training length, needle-in-a-haystack, decode speed and cache memory, and a
side-by-side comparison. `python -m pretrain.evaluate` is the command line; each suite is a module
here with one `run_*` function returning plain JSON-able numbers, and `plots` draws them."""
