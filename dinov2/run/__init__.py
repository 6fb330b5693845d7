"""Launching training: SLURM environment, preemption signal, requeue and submitit submission.

Kept apart from ``dinov2.train`` (which only trains): the trainer asks this package whether a
preemption signal arrived and the CLI / sbatch scripts use it to start jobs.  Nothing here imports
the trainer's runtime code.
"""
