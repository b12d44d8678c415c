"""Heatmaps that show where a model's evidence was: attention pooling weights and Grad-CAM on the
fused encoder features (fast), occlusion sensitivity (slow reference), on the input's own grid."""
