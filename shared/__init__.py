"""splitserve's core: models, preprocessing, partitioning, codec and wire format, no I/O."""
