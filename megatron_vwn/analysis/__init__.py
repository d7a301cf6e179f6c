"""Analysis of runs and sweeps: held-out scoring, reports, speed-ups, profiles, the depth-width
shape study and its interaction metrics."""
