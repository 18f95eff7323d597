"""Many same-shaped configs trained as one program: which configs stack, the stacked model and
optimizers, the loop, and the stack of runs, each member an ordinary MLflow run."""
