"""The client side: the gRPC pipeline client, tiling of whole-board scans, and what the CLI writes."""
from tools.client.pipeline_client import InferenceFailed, PipelineClient
from tools.client.tiling import TileSpec

__all__ = ["InferenceFailed", "PipelineClient", "TileSpec"]
