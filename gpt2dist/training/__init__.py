"""Training: the trainer and what it is built from: the launcher environment and process group
(dist), DeepSpeed (deepspeed_env, engine), the optimizer and schedule (optim), checkpoints and
the run directory, the loss guard, preemption, validation and metrics."""
