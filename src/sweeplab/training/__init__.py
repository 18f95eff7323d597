"""The training loop and what it runs: the state it trains, eager and CUDA-graph steps, clean stops
on signals, and the GPU's first uses made ahead of the first epoch."""
