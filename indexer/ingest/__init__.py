"""Folder -> index (`pvl-search index`): `planning.py` scans and decides what is new, changed
or gone; a producer decodes and encodes (`local_producer.py` in worker processes here,
`ray_producer.py` on Ray actors) and yields `produced.py`'s records; `writer.py`, the one
writer of the run, stores them; `pipeline.py` wires these together (`build_index`)."""
