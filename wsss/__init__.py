"""wsss: the weakly supervised segmentation pipeline library (numpy/torch; no Ray, no MLflow)."""
