"""The learned cost model (features from IR kernels, measurements, XGBoost). Built by its own issue;
nothing in kiln depends on it yet."""
