"""Process groups, seeds, pipeline schedules and the rank watchdog (the CPU support layer is compat.cpu)."""
