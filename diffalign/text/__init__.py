"""The text side: causal-LM log-probabilities of completions, and TRL-style preference data."""
