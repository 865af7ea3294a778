"""Index stage (DESIGN §6): FAISS index bundles built from a model bundle's item tower, published atomically.

factory (factory strings, metric, build), quality (recall vs exact search), bundle (files, load, verify), publish
(CURRENT and the Redis announcement over models/publish.py's staging, rename and retention), search (multi-interest
merge with exclusion), options (what build / add / rebuild take), build / rebuild / upsert (the jobs), cli
(`quiver-index`). Imports `models/` only, never `training/`.
"""
