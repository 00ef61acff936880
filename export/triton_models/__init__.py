"""Triton Python-backend models. The exporter copies these files as `model.py` into the model repository;
Triton's Python backend stub imports them, with PYTHONPATH set by `export.triton_server`."""
