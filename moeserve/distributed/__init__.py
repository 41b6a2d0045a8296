"""Process groups (TP, PP, DP, EP) set once per worker, their collectives, and worker launch."""
