"""Training: the NextStep loss loop, the VAE tokenizer, checkpoints and the staged recipe."""
