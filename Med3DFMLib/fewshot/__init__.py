"""Few-shot adaptation: learn a new structure from a few labelled slices or volumes on the frozen
encoder (a small point-wise adapter, or training-free prototypes), with a feature cache so that a
second round on the same volume skips the encoder."""
