"""The splitserve cloud service: a FastAPI app that runs the tails of split models."""
