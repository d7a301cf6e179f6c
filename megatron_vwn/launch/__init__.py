"""Process launch: rank resolution, local multi-process (torchrun) and SLURM."""
