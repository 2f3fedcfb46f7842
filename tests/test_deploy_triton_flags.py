"""The Deployment's tritonserver flags, run: the bundled tritonserver (2.51, nvidia-pytriton) starts with exactly
the flags of the rendered GPU Deployment (on an empty model repository, so it is up in a second or two) and
restricts the admin APIs as the manifests and docs/deploy.md say, over HTTP and gRPC.

The pinned serving release (NVIDIA_RELEASE 26.08) documents the same flags; it cannot run here.
"""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from deploy.render import KUSTOMIZATIONS, build
from tests.test_k8s_manifests import server, triton, tritonserver_flags
from tools.serve.triton_server import TritonServer

KEY = "test-admin-key"
HEADER = "pcb-admin-key"
GRPC_HEADER = f"triton-grpc-protocol-{HEADER}"  # Triton's prefix for the gRPC restriction metadata
# Flags TritonServer sets itself (ports, repository, backends, exit timeout): the rest are the Deployment's own.
OWN = ("--model-repository=", "--exit-timeout-secs=", "--model-config-name=")


class DeploymentFlags(TritonServer):
    def __init__(self, flags: list[str], **options):
        super().__init__(**options)
        self.deployment_flags = flags

    def command(self, backend_directory, server_binary):
        return super().command(backend_directory, server_binary) + self.deployment_flags


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory):
    """Overrides conftest's fixture of that name for this module (so these tests are in the live tier): a
    tritonserver with the rendered GPU Deployment's flags on an empty model repository."""
    flags = [flag.replace("${key}", KEY) for flag in tritonserver_flags(triton(server(build(KUSTOMIZATIONS["gpu"]))))
             if not flag.startswith(OWN)]
    assert any(flag.startswith("--cuda-memory-pool-byte-size=") for flag in flags)
    empty = tmp_path_factory.mktemp("empty-model-repository")
    # Without the local supervisor: its model control and key would add to the Deployment's own restrictions.
    with DeploymentFlags.on_free_ports(flags=flags, model_repository=empty, model_config_name=None, ready_models=(),
                                       ready_timeout_s=60, supervise=False, http_address="0.0.0.0") as started:
        yield started


def http_status(url: str, headers: dict | None = None, method: str = "GET") -> int:
    request = urllib.request.Request(url, headers=headers or {}, method=method, data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_http_admin_apis_need_the_key_and_health_and_metadata_do_not(triton_server):
    base = f"http://{triton_server.http_url}"
    assert http_status(f"{base}/v2/health/ready") == 200
    assert http_status(f"{base}/v2") == 200  # server metadata
    for path, method in (("/v2/models/stats", "GET"), ("/v2/repository/index", "POST"), ("/v2/trace/setting", "GET"),
                         ("/v2/logging", "GET"), ("/v2/systemsharedmemory/status", "GET")):
        assert http_status(base + path, method=method) == 403, path
        assert http_status(base + path, {HEADER: "wrong"}, method) == 403, path
        assert http_status(base + path, {HEADER: KEY}, method) == 200, path


def test_grpc_admin_protocols_need_the_key_as_prefixed_metadata(triton_server):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        assert client.is_server_ready() and client.get_server_metadata().name == "triton"
        for call in (client.get_inference_statistics, client.get_model_repository_index):
            with pytest.raises(InferenceServerException, match="restricted") as refused:
                call()
            # Triton answers UNAVAILABLE: the client's retry must not retry this (tests/test_client_retry.py).
            assert refused.value.status() == "StatusCode.UNAVAILABLE"
            with pytest.raises(InferenceServerException, match="restricted"):
                call(headers={HEADER: KEY})  # without Triton's prefix the key is not seen
            call(headers={GRPC_HEADER: KEY})
    finally:
        client.close()
