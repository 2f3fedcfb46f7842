"""The client side: the gRPC client of the served models, annotation, and what the CLI writes."""
from tools.client.pipeline_client import InferenceFailed, PipelineClient

__all__ = ["InferenceFailed", "PipelineClient"]
