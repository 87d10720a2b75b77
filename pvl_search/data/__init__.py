"""Data: the synthetic benchmark, its scene labels and training stream, caption-file formats, and
(video, caption) pair sets over a frame cache."""
