"""One run from config to metrics: the task and its phases, checkpoints, resume, seeding, phase
timings, and ``sweeplab-eval``'s evaluation task."""
