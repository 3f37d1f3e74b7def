"""Files: checkpoint reading, the pruned checkpoint writer, the saliency store, staging, the report."""
