"""Self-supervised pretraining of the encoder: progressive volumetric masking (3DME) with a
hierarchical, encoder-driven decoder (Hi-End-MAE), on one CPU or many GPUs under torchrun."""
