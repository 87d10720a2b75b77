"""Data: the synthetic benchmark, its scene labels and training stream, caption-file formats."""
