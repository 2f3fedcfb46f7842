"""Resident memory of the serving processes, read from /proc: tritonserver and each Python backend stub.

The server is found as the process listening on the gRPC port it was reached at, so this works for a
server started for the run and for one already running on this machine. The stubs are its child processes
named ``triton_python_backend_stub``; each one's command line names the model file and the model instance.
"""
from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")
STUB = "triton_python_backend_stub"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
TCP_LISTEN = "0A"  # the socket state column of /proc/net/tcp


def _listening_socket_inodes(port: int) -> set[str]:
    inodes = set()
    for table in (PROC / "net" / "tcp", PROC / "net" / "tcp6"):
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            local_address, state, inode = fields[1], fields[3], fields[9]
            if state == TCP_LISTEN and int(local_address.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def listening_process(port: int) -> int | None:
    """The pid of the process listening on TCP ``port`` (None when no process here does, or it is not ours to see)."""
    sockets = {f"socket:[{inode}]" for inode in _listening_socket_inodes(port)}
    for fd_dir in PROC.glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) in sockets for fd in fd_dir.iterdir()):
                return int(fd_dir.parent.name)
        except OSError:  # gone meanwhile, or another user's process
            continue
    return None


def _command_line(pid: int) -> list[str]:
    return (PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]


def _parent(pid: int) -> int:
    # The command name in /proc/<pid>/stat is in parentheses and may itself contain spaces.
    return int((PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def resident_mib(pid: int) -> dict[str, float]:
    """RSS now and its peak (VmHWM) since the process started, in MiB."""
    fields = dict(line.split(":", 1) for line in (PROC / str(pid) / "status").read_text().splitlines() if ":" in line)
    kib = lambda key: int(fields[key].split()[0])
    return {"rss_mib": kib("VmRSS") / 1024, "peak_rss_mib": kib("VmHWM") / 1024}


def stub_processes(server_pid: int) -> list[dict]:
    """The server's Python backend stubs: pid, model and instance (as the stub's command line names them)."""
    stubs = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if _parent(int(entry.name)) != server_pid:
                continue
            command = _command_line(int(entry.name))
        except OSError:
            continue
        if command and Path(command[0]).name == STUB:
            model = Path(command[1]).parent.parent.name  # <repository>/<model>/<version>/model.py
            instance = next((arg for arg in command[2:] if arg.startswith(f"{model}_")), model)
            stubs.append({"pid": int(entry.name), "model": model, "instance": instance})
    return sorted(stubs, key=lambda stub: stub["instance"])


def server_memory(url: str) -> dict:
    """Resident memory of the tritonserver serving ``url`` and of each of its stubs, or why it cannot be read."""
    host, _, port = url.rpartition(":")
    if host not in LOCAL_HOSTS:
        return {"available": False, "reason": f"the server at {url} is not on this machine"}
    server_pid = listening_process(int(port))
    if server_pid is None:
        return {"available": False, "reason": f"no process on this machine that can be read listens on port {port}"}
    server = {"pid": server_pid, "process": Path(_command_line(server_pid)[0]).name, **resident_mib(server_pid)}
    stubs = [{**stub, **resident_mib(stub["pid"])} for stub in stub_processes(server_pid)]
    return {
        "available": True,
        "server": server,
        "stubs": stubs,
        "total_rss_mib": server["rss_mib"] + sum(stub["rss_mib"] for stub in stubs),
    }
