"""Recommenders with one API: ConvMF and its baselines (PMF by ALS, SGD matrix factorisation)."""
