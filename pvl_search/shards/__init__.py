"""Training data as WebDataset tar shards: written once from captioned videos (writer.py),
streamed to one or many training workers (reader.py). The format: format.py."""
