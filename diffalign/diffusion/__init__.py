"""Likelihoods of diffusion models: the estimators every diffusion method builds on."""
