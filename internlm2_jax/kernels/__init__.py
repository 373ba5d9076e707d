"""Attention kernels. They know nothing of the model: plain arrays in, plain arrays out."""
