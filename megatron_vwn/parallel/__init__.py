"""Process groups, seeds, pipeline schedules and the rank watchdog (CPU support: compat.cpu)."""
