"""Analysis of runs and sweeps: held-out scoring, reports, speed-ups and profiles."""
