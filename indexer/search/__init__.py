"""Text -> results: `request.py` (what a search may ask for: the one set of rules, and the
defaults), `searcher.py` (FAISS retrieval, rerank, grouping per video), `rerankers.py` (which
reranker a request gets and how it scores from stored rows), `single_stream.py` (the joint
encoder over decoded candidates), `batching.py` (concurrent requests in one encoder call),
`state.py` (the query cache and the lock a reopened index is swapped under)."""
