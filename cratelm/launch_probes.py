"""What ``cratelm launch-check`` asks the network from this host: name resolution, whether
an address is this machine's, whether the master address is node 0 of the selection, and
whether the rendezvous port is free (here) or answers (elsewhere)."""

from __future__ import annotations

import errno
import socket

from cratelm.dist import free_port


def addresses(host: str) -> set[str] | None:
    """The IP addresses ``host`` resolves to on this machine, or None when it does not resolve."""
    try:
        return {sa[0] for *_, sa in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError):
        return None


def is_local_address(family: int, ip: str) -> bool:
    """True when ``ip`` belongs to this host (binding to it succeeds)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


def is_this_host(host: str) -> bool:
    """True when ``host`` resolves to an address of this machine."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return any(is_local_address(f, sa[0]) for f, _, _, _, sa in infos)


def master_is_node0(addr: str, hosts: list[str]) -> tuple[str | None, str | None]:
    """``(problem, warning)`` about ``--master_addr addr`` for the selected ``hosts`` (node 0
    first): rank 0 runs on node 0 and its store listens there, so the address must be node 0's.
    A problem when it names (or resolves to an address of) another selected host only, or
    when every name resolves here and none matches; a warning when that cannot be told here."""
    if not hosts or addr == hosts[0]:
        return None, None
    listed = ", ".join(hosts)
    want = addresses(addr)
    found = {h: addresses(h) for h in hosts}
    if want and found[hosts[0]] and want & found[hosts[0]]:
        return None, None
    if addr in hosts or any(want and a and want & a for a in found.values()):
        other = addr if addr in hosts else next(h for h, a in found.items() if want and a and want & a)
        return (f"--master_addr {addr} is {other}, node {hosts.index(other)} of the selection, not node 0 "
                f"({hosts[0]}), where rank 0 and its rendezvous store run: use --master_addr {hosts[0]}"), None
    if want is not None and all(a is not None for a in found.values()):
        return (f"--master_addr {addr} is not among the selected hosts ({listed}): rank 0 and its rendezvous "
                f"store run on node 0, {hosts[0]}; use --master_addr {hosts[0]} (or an address of it)"), None
    return None, (f"--master_addr {addr}: could not tell from here whether it is node 0 ({hosts[0]}): "
                  f"{'it does not resolve' if want is None else 'not every host name resolves'} on this machine")


def probe_master(addr: str, port: int, role: str = "head", timeout: float = 3.0) -> str | None:
    """A problem with the rendezvous address ``addr:port`` as seen from this host, or None.

    ``role`` says who is asking: ``head`` (the node that starts everything, e.g. pdsh's),
    ``master`` (node_rank 0 itself: the address must be this host's), ``worker`` (node_rank
    > 0: node 0 may already listen) or ``c10d`` (any node of a c10d rendezvous).
    On this host the port must be free to bind, since rank 0's store will listen there
    (a worker on the same host, as in a simulated two-node run, may find it taken by node 0).
    A remote address must answer: a refused connection means the host is up and nothing
    listens yet; silence or no route means it is unreachable from here.
    """
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"master address {addr!r} does not resolve on this host ({e.strerror})"
    family, _, _, _, sockaddr = infos[0]
    ip = sockaddr[0]
    if is_local_address(family, ip):
        if role == "worker":
            return None
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as torch's TCPStore does
            try:
                s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return (f"master port {port} is already in use on this host ({addr}); "
                            f"pick another --master_port, e.g. {free_port('')}")
                return f"cannot bind master port {port} on this host ({addr}): {e.strerror}"
        return None
    if role == "master":
        return (f"this is node_rank 0, which hosts the rendezvous, but master address {addr} ({ip}) "
                "is not an address of this host")
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(sockaddr)
        except ConnectionRefusedError:
            return None                 # the host answered and nothing listens yet: as it should be
        except socket.timeout:
            return (f"master {addr}:{port} is unreachable from this host: no answer in {timeout:g} s "
                    "(a firewall, or not an address of the master node?)")
        except OSError as e:
            return f"master {addr}:{port} is unreachable from this host: {e.strerror or e}"
    if role in ("worker", "c10d"):
        return None                     # node 0 (or the rendezvous host) may already be listening
    return f"master port {port} is already in use on {addr}; pick another --master_port"
