"""brainseg: lower-grade glioma segmentation pipeline stages (one module per DVC stage)."""
