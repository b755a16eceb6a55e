"""The splitserve device client: runs the head of a split model and talks to the service."""
