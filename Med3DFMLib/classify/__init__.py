"""Classification adapters on the frozen encoder: task-query attention pooling over cached
stride-16 features (whole scan or a region), trained from a few labelled scans, with temperature
calibration from cross-fitting, and batch lists."""
