"""brainseg: lower-grade glioma segmentation pipeline stages (one module per DVC stage)."""
import os

# TensorFlow turns its oneDNN CPU kernels on by default only on CPUs with AVX512-VNNI / BF16 or AMX; on others
# (AVX2 laptops, this project's machine) it falls back to Eigen kernels that train the CPU U-Net 2-3x slower
# (`python -m benchmarks.training`). It reads the variable once, at import, so it is set here, before any stage
# imports TensorFlow; set TF_ENABLE_ONEDNN_OPTS=0 to get TensorFlow's own choice.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
