"""The passes over a model: the block stream, calibration, feedback full, reconstruction, data parallelism,
writing the outputs, and the dry-run plan."""
