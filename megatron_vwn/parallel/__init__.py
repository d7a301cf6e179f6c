"""Process groups, seeds and the CPU support layer."""
