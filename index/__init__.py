"""Index stage (DESIGN §6): FAISS and ScaNN index bundles built from a model bundle's item tower, published atomically.

factory (layouts, metric, FAISS build), scann_backend (ScaNN build, files, load), backend (the one search interface
over both), quality (recall vs exact search, tuning to the floor), speed (single-query timing), auto (`--index auto`:
the fastest candidate at the floor), bundle (files, load, verify), publish (CURRENT and the Redis announcement over
models/publish.py's staging, rename and retention), search (multi-interest merge with exclusion), options (what build
/ add / rebuild take), build / rebuild / upsert (the jobs), cli (`quiver-index`). Imports `models/` only, never
`training/`.
"""
