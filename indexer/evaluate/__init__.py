"""How much reranking buys (`pvl-search eval`): `driver.py` runs every method on every caption
of a split, `report.py` holds the results and their table, `plot.py` draws R@1 and latency
against K."""
