"""Weight quantization per layer: int8 per channel, AWQ / round-to-nearest 4 and 3 bits group-wise."""
