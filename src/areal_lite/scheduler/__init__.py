"""Scheduler stage (placement): where the run's processes start — this machine
(`local.py`: torchrun for scheduler.train_processes > 1) or a Slurm job (`slurm.py`)."""
