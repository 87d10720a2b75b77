"""The vector index of an index folder, behind one interface (`add`, `remove_ids`, `search`,
`rebuild_from`, `save`, `close`, `fetched_states`): `faiss_index.VectorIndex` (a file in the
folder, `faiss_file.py` its format) or `milvus.MilvusVectors` (a Milvus Lite file or server).
`choice.py` reads which one an index records and opens it. Vectors are derived data: they can
always be rebuilt from the embedding store."""
