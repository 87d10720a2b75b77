"""One index on disk: SQL metadata + row stores + vectors, kept consistent through crashes.

An index folder holds ``embeddings.f16`` (d per segment), ``rerank_states.f16`` (D + H),
optionally ``latents.f16`` (N * D), ``vectors.faiss``, ``index.lock``, ``thumbnails/`` (a
JPEG per segment, thumbnails.py) and, by default, the SQLite database
``index.sqlite`` (or any SQLAlchemy URL, e.g. PostgreSQL).

Crash-safety protocol (the process may be SIGKILLed at any instant):

1. SQL is the source of truth. ``index_info.committed_rows`` is the number of store rows
   that belong to committed segments; segment ids are store row numbers ``0..rows-1``.
2. ``add_video`` appends the video's rows to every store and fsyncs them FIRST, then commits
   ONE SQL transaction: video row (inserted or updated), its segments (ids = the new row
   numbers), ``committed_rows += n``. Rows appended but never committed are invisible: no
   segment points at them.
3. Removals (``mark_removed``, ``mark_failed``, re-indexing a changed file) only flag
   segments removed in SQL, in the same transaction bumping ``index_info.removal_seq``;
   store rows stay (append-only), only FAISS forgets the ids.
4. FAISS is derived. After a commit the in-memory index is updated; ``save_vectors`` writes it
   atomically (tmp + fsync + rename) with the ``committed_rows`` and ``removal_seq`` it
   reflects, and the index uuid.
5. On open (and after a write that failed half-way), recovery reads SQL and:
   - truncates every store to ``committed_rows`` (drops rows of an add that never
     committed; a torn last row is dropped by the store itself); a store SHORTER than that
     is damage, not a crash, and is refused;
   - loads the FAISS file; if it is missing, damaged, from another index or covers more
     rows than SQL, rebuilds it from the embedding store; otherwise adds the live segments
     in ``[file rows, committed_rows)`` and, if ``removal_seq`` differs, removes the ids of
     every removed segment below the file's rows. Ids are only ever added above the rows
     the file covers, so nothing is added twice.
   So after any crash: every FAISS id has its SQL row and its store rows, stores hold
   exactly the committed rows, and committed videos are known (``known_videos``) and are
   not redone.

A second writer on the same folder is refused (``index.lock``, flock: released by the
kernel when a process dies). The store headers and the FAISS file carry the index uuid
from SQL, so a folder paired with the wrong database is refused rather than "recovered".

Rooms: `index_store.IndexStore` is the one writer, `index_reader.IndexReader` any number of
readers, `base.StoreBase` what both share (stores, vectors kept in step with SQL, the reads);
`schema.py` and `database.py` the SQL side (`sql_writes.py` the writer's statements),
`row_store.py` the append-only stores, `thumbnails.py`, `media_files.py` (files served by id),
`vectors/` the vector index behind one interface (FAISS file or Milvus).
"""
