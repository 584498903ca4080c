"""The supervisor (``shardbroker serve``): binds the listener, starts the acceptor
and the workers, restarts a process that dies, and shuts down in order.

Startup: lock the data directory, bind the TCP listener (so ``port = 0`` resolves
once and restarts keep the port), start N workers and the acceptor, wait for each
to report ready on a pipe, then log ``ready``.

Shutdown on SIGTERM/SIGINT, bounded by ``server.shutdown_timeout``: stop the
acceptor first (no new clients), then the workers (each tells its 5.0 clients
0x8B and commits), then SIGKILL whatever is still running.

With ``[cluster] node_id`` (a cluster node, ``cluster/node.py``): the shard stores are made to
follow the node's layout before any child starts (``storage/layout.py``; without it, back to
the hash layout if they followed one), and a ``ClusterNode`` thread joins etcd and sends every
child its grant over the control channel (op ``fence``); at shutdown it leaves after the
children have stopped.

A child that exits with status 2 hit a fatal configuration or store error: the
broker stops with that error rather than restarting it in a loop.

Reload (SIGHUP, or ``shardbroker ctl reload``): the configuration file the broker was started
with is read again, with the same command-line overrides, and checked with the password and
ACL files it names; one that does not load is one error line and changes nothing. Otherwise
``process/reload.py`` sorts the changed settings into live ones and those that need a restart
(logged by name), and the new configuration goes to every worker and the acceptor over their
control sockets (op ``reload``): each applies the live settings and the workers read the
password and ACL files again. Restarted children get it too. Nobody is disconnected but
clients the new files no longer let in.

With ``NOTIFY_SOCKET`` set (systemd ``Type=notify``) the supervisor reports readiness, reloads
and shutdown (``process/notify.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardbroker import _compiled
from shardbroker.config import Config, ConfigError, ListenerConfig, load_config
from shardbroker.operations.admin import CONTROL_SOCKET, Admin
from shardbroker.operations.control import ThreadServer
from shardbroker.operations.metrics import MetricsServer
from shardbroker.operations.sys_tree import SysPublisher
from shardbroker.process import reload
from shardbroker.process.notify import Notifier, without_notify_socket
from shardbroker.process.runtime import ANNOUNCE
from shardbroker.storage.lock import LOCK_NAME, DataDirInUse, lock_data_dir

IDENTITY_FILE = "cluster-identity.json"  # cluster/numbers.py (not imported without [cluster])

if TYPE_CHECKING:
    from shardbroker.cluster.grant import Grant
    from shardbroker.cluster.node import ClusterNode
    from shardbroker.cluster.numbers import Identity

DEFER_ACCEPT = 1  # seconds
RUN_NAME = "run"  # DATA/run: the sockets of the processes, when the path is short enough
RUN_NOTE = "run-dir"  # DATA/run-dir names the run directory in use
SOCKET_PATH_MAX = 108  # sun_path, with its terminating NUL
LONGEST_SOCKET_NAME = len("/ctl-acceptor.sock")  # and handoff-N.sock, ctl-N.sock, shard-N.zmq (N < 1000)

log = logging.getLogger("shardbroker.process.supervisor")
announce = logging.getLogger(ANNOUNCE)  # where it listens, and ready: at every log level

FATAL = 2


def _why(exc: OSError) -> str:
    """An OSError as a few words (its strerror), without the errno number."""
    return exc.strerror or errno.errorcode.get(exc.errno or 0, "") or str(exc)


def config_overrides(config: Config) -> dict[str, object]:
    """The resolved configuration as dotted overrides (how children receive it)."""
    out: dict[str, object] = {}
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if section.name == "listeners":
            if value:
                out["listener"] = [dataclasses.asdict(lst) for lst in value]
            continue
        for f in dataclasses.fields(value):
            out[f"{section.name}.{f.name}"] = getattr(value, f.name)
    return out


MAX_OPEN_FILES = 1 << 20


class Child:
    def __init__(self, name: str, argv: list[str], pass_fds: tuple[int, ...]) -> None:
        self.name = name
        self.argv = argv
        self.pass_fds = pass_fds
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.restarts = 0
        self.ready = False


def _security_problem(config: Config) -> str | None:
    """Why the password and ACL files ``config`` names do not load (read now), or None."""
    from shardbroker.security.acl import AclFileError
    from shardbroker.security.auth import load_policies
    from shardbroker.security.passwords import PasswordFileError

    try:
        load_policies(config)
    except (PasswordFileError, AclFileError) as exc:
        return str(exc)
    return None


class ReloadError(ValueError):
    """A reload that changed nothing: the configuration or a file it names does not load."""


class Supervisor:
    def __init__(self, config: Config, config_path: Path | None = None,
                 overrides: Mapping[str, object] | None = None) -> None:
        """``config_path`` and ``overrides``: what ``config`` was loaded from, read again at a
        reload (without a file, a reload reads the password and ACL files only)."""
        self.config = config
        self.config_path = config_path
        self.overrides = dict(overrides or {})
        self.shards = config.server.worker_count
        self.data_dir = Path(config.server.data_dir)
        self._stop = False
        self._created = False
        self._reload = False
        self._reloading = threading.Lock()  # SIGHUP (main loop) and ctl reload (control thread)
        self._admin: Admin | None = None
        self._sys_tree: SysPublisher | None = None
        self._bound: tuple[int, ...] = ()  # the listeners' ports as bound (port = 0 resolved)
        self.env: dict[str, str] = {}  # the children's environment
        self.notifier = Notifier()
        self.exit_code = 0

    def request_reload(self) -> None:
        """Reload at the next turn of the main loop (SIGHUP)."""
        self._reload = True

    def _child_config(self, config: Config) -> str:
        """``config`` as the children get it: JSON overrides, with the ports bound."""
        bound = tuple(dataclasses.replace(lst, port=port)
                      for lst, port in zip(config.effective_listeners, self._bound, strict=True))
        return json.dumps(config_overrides(dataclasses.replace(config, listeners=bound)))

    def reload(self) -> dict[str, Any]:
        """Read the configuration again and apply what can change live (see the module
        docstring); the answer of ``ctl reload``. ``ReloadError`` (logged, one line) when the
        new configuration does not load: then nothing changed."""
        with self._reloading:
            self.notifier.reloading()
            try:
                return self._reload_now()
            finally:
                self.notifier.ready(self._status())

    def _reload_now(self) -> dict[str, Any]:
        try:
            new = load_config(self.config_path, self.overrides)
        except ConfigError as exc:
            log.error("reload failed, the previous configuration stays in force: %s", exc)
            raise ReloadError(f"reload failed, the previous configuration stays in force: {exc}") from None
        problem = _security_problem(new)
        if problem is not None:
            log.error("reload failed, the previous password and ACL files stay in force: %s", problem)
            raise ReloadError(f"reload failed, the previous password and ACL files stay in force: {problem}")
        step = reload.plan(self.config, new)
        self.config = step.config
        child_config = self._child_config(step.config)
        self.env["SHARDBROKER_CONFIG"] = child_config  # for the children started from now on
        logging.getLogger().setLevel(step.config.server.log_level.upper())
        if self._sys_tree is not None:
            self._sys_tree.interval = step.config.server.sys_interval
        if step.restart_needed:
            log.warning("reload: changed but needing a restart (the running values stay): %s",
                        ", ".join(step.restart_needed))
        log.info("reload: %s", "applied " + ", ".join(step.changed) if step.changed else "no live setting changed")
        assert self._admin is not None
        answer = self._admin.tell_all({"op": "reload", "config": json.loads(child_config)})
        for name, why in sorted(answer["missing"].items()):
            log.error("reload: shard %s did not apply it: %s", name, why)
        if answer.get("acceptor_missing"):
            log.error("reload: the acceptor did not apply it: %s", answer["acceptor_missing"])
        return {"changed": list(step.changed), "restart_needed": list(step.restart_needed), **answer}

    def _status(self) -> str:
        return f"serving: {self.shards} workers"

    def _lock_data_dir(self) -> int:
        """Create the data directory if needed and take its lock; every failure is one line
        (``SystemExit``). ``self._created`` says whether this start made the directory."""
        where = self.data_dir
        if where.exists() and not where.is_dir():
            raise SystemExit(f"shardbroker: data directory {where} is not a directory")
        self._created = not where.exists()
        try:
            where.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SystemExit(f"shardbroker: cannot create data directory {where}: {_why(exc)}") from None
        try:
            return lock_data_dir(where, os.getpid())
        except DataDirInUse as exc:
            held = f" (pid {exc.pid})" if exc.pid is not None else ""
            raise SystemExit(f"shardbroker: data directory {where} is in use by another broker or "
                             f"reshard{held}") from None
        except OSError as exc:
            raise SystemExit(f"shardbroker: cannot lock data directory {where}: {_why(exc)}") from None

    def _forget_data_dir(self, lock_fd: int) -> None:
        """A start that failed before any child ran leaves no new data directory behind."""
        os.close(lock_fd)
        if not self._created:
            return
        for name in (LOCK_NAME, RUN_NOTE, IDENTITY_FILE):
            with contextlib.suppress(OSError):
                (self.data_dir / name).unlink()
        with contextlib.suppress(OSError):
            self.data_dir.rmdir()

    def _bind(self, host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise SystemExit(f"shardbroker: cannot listen on {host}:{port}: {exc.strerror}") from None
        # Accepted sockets inherit TCP_NODELAY (acknowledgements leave at once). TCP_DEFER_ACCEPT:
        # the kernel hands a connection to the acceptor once its first bytes (the CONNECT) are
        # in, so the acceptor wakes once per client, not twice; a client silent for DEFER_ACCEPT
        # seconds is handed over anyway and then has limits.connect_timeout as usual.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(socket, "TCP_DEFER_ACCEPT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT)
        sock.listen(4096)
        return sock

    def _run_dir(self) -> str:
        """A private directory for the Unix and ipc sockets: ``DATA/run`` when its socket paths
        fit (at most 107 bytes), else a new ``shardbroker-*`` in the temporary directory. Inside
        the data directory, what a SIGKILL leaves behind goes with the directory; the previous
        one (named in ``DATA/run-dir``) is removed at every start."""
        note = self.data_dir / RUN_NOTE
        try:
            old = note.read_text().strip()
        except OSError:
            old = ""
        inside = self.data_dir.resolve() / RUN_NAME
        if old and os.path.basename(old).startswith("shardbroker-") and os.path.isdir(old):
            shutil.rmtree(old, ignore_errors=True)
        try:
            if len(os.fsencode(inside)) + LONGEST_SOCKET_NAME < SOCKET_PATH_MAX:
                shutil.rmtree(inside, ignore_errors=True)
                inside.mkdir(mode=0o700)
                run_dir = str(inside)
            else:
                run_dir = tempfile.mkdtemp(prefix="shardbroker-")
            note.write_text(run_dir + "\n")
        except OSError as exc:
            raise SystemExit(f"shardbroker: cannot make the run directory: {exc.filename}: {_why(exc)}") from None
        return run_dir

    def _check_data_dir(self) -> None:
        """Refuse, before any worker writes, a data dir made for another shard count."""
        from shardbroker.storage.lmdb_store import StoreError, data_dir_shards

        try:
            existing = data_dir_shards(self.data_dir)
        except StoreError as exc:
            raise SystemExit(f"shardbroker: {exc}") from None
        if existing is not None and existing != self.shards:
            raise SystemExit(
                f"shardbroker: data directory {self.data_dir} was created with {existing} workers, not "
                f"{self.shards}; start with --workers {existing} or use another data directory"
            )

    def _check_cluster(self) -> type[ClusterNode] | None:
        """With ``[cluster] node_id``: the ``ClusterNode`` class (the etcd client is an extra);
        a one-line error when it cannot serve so."""
        cluster = self.config.cluster
        if not cluster.enabled:
            return None
        from shardbroker.storage.lmdb_store import VIRTUAL_SHARDS

        if cluster.virtual_shards != VIRTUAL_SHARDS:
            raise SystemExit(f"shardbroker: cluster.virtual_shards: a node serves {VIRTUAL_SHARDS}"
                             " virtual shards (the store's); other counts are not served yet")
        try:
            from shardbroker.cluster.node import ClusterNode
        except ImportError as exc:
            raise SystemExit(f"shardbroker: [cluster] needs the cluster extra ({exc.name or exc}):"
                             " pip install 'shardbroker[cluster]'") from None
        return ClusterNode

    def _check_bus_ports(self) -> None:
        """A cluster node's bus binds worker ``w`` at ``[cluster] advertise`` PORT + w: refuse
        to start, in one line, when that host is not this host's or a port is taken, or is
        one of this node's listeners'. Before anything but the lock is made in the data directory
        (a start that made it removes it)."""
        if not self.config.cluster.enabled:
            return
        from shardbroker.cluster.numbers import bus_ports_problem

        problem = bus_ports_problem(self.config.cluster.advertise, self.shards,
                                    [(lst.host, lst.port) for lst in self.config.effective_listeners])
        if problem is not None:
            raise SystemExit(f"shardbroker: error: {problem}")

    def _cluster_identity(self) -> Identity | None:
        """A cluster node's identity (``cluster/numbers.py``), made at its first clustered
        start; refused in one line when the data directory is another node's."""
        cluster = self.config.cluster
        if not cluster.enabled:
            return None
        from shardbroker.cluster.numbers import IdentityError, ensure_identity
        from shardbroker.peer.bus import curve_keypair

        try:
            return ensure_identity(self.data_dir, cluster.node_id, curve_keypair)
        except IdentityError as exc:
            raise SystemExit(f"shardbroker: error: {exc}") from None

    def _arrange_stores(self) -> None:
        """Before any worker starts: the stores follow the layout this run serves with
        (``storage/layout.py``): a cluster node's table, else the hash of the client ID. Moves
        that a kill interrupted are finished or undone first, and the durable forwards between
        workers that the last stop left unapplied are applied before any session moves
        (``process/drain.py``)."""
        from shardbroker.storage.layout import arrange, layouts
        from shardbroker.storage.lmdb_store import VIRTUAL_SHARDS, StoreError

        cluster = self.config.cluster
        storage = self.config.storage
        try:
            if cluster.enabled:
                from shardbroker.cluster.grant import local_owners

                name: str | None = f"rendezvous:{cluster.node_id}"
                table: list[int] | None = local_owners(cluster.node_id, self.shards, VIRTUAL_SHARDS)
            elif any(found is not None for found in layouts(self.data_dir, self.shards)):
                name, table = None, None
            else:
                return
            from shardbroker.process.drain import deliver_pending

            done = arrange(self.data_dir, self.shards, name, table, map_size=storage.map_size,
                           max_map_size=storage.max_map_size, sync=storage.durability == "fsync",
                           before_moving=lambda stores: deliver_pending(self.config, self.data_dir, stores))
        except StoreError as exc:
            raise SystemExit(f"shardbroker: {exc}") from None
        for line in done.lines:
            log.info("%s", line)

    def _check_security(self) -> None:
        """Read the password and ACL files once before any child starts: a missing or broken
        one is a one-line error and exit status 2, not a worker that keeps failing."""
        problem = _security_problem(self.config)
        if problem is not None:
            raise SystemExit(f"shardbroker: {problem}")

    def _check_tls(self) -> None:
        """Load every mqtts listener's certificate and key once before any child starts."""
        from shardbroker.transport.tls import TlsError, server_context

        for lst in self.config.effective_listeners:
            if lst.tls:
                try:
                    server_context(lst)
                except TlsError as exc:
                    raise SystemExit(f"shardbroker: listener {lst.name}: {exc}") from None

    @staticmethod
    def _raise_file_limit() -> None:
        """Every client is a descriptor (two for a TLS or WebSocket client in the acceptor): take
        the hard limit of open files as the soft one, for this process and the children it
        starts, instead of the usual 1,024."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else MAX_OPEN_FILES
        want = min(want, MAX_OPEN_FILES)
        if soft != resource.RLIM_INFINITY and soft < want:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            except (ValueError, OSError) as exc:
                log.warning("cannot raise the open files limit from %d: %s", soft, exc)
                return
            log.info("open files limit raised from %d to %d", soft, want)

    def run(self) -> int:
        node_class = self._check_cluster()
        self._check_security()
        self._check_tls()
        self._raise_file_limit()
        lock_fd = self._lock_data_dir()
        listeners = self.config.effective_listeners
        socks: list[socket.socket] = []
        try:
            self._check_bus_ports()
            self._check_data_dir()
            identity = self._cluster_identity()
            self._arrange_stores()
            for lst in listeners:
                socks.append(self._bind(lst.host, lst.port))
            run_dir = self._run_dir()
            admin = self._admin = Admin(run_dir, self.shards, self.reload)
            metrics = (MetricsServer(self.config.metrics.host, self.config.metrics.port, admin)
                       if self.config.metrics.enabled else None)
        except BaseException:
            for sock in socks:
                sock.close()
            self._forget_data_dir(lock_fd)
            raise
        host, port = socks[0].getsockname()[:2]
        ready_r, ready_w = os.pipe()
        os.set_blocking(ready_r, False)
        env = self.env = without_notify_socket(dict(os.environ))
        # The children see the ports bound (port = 0 resolved), for their logs.
        self._bound = tuple(sock.getsockname()[1] for sock in socks)
        env["SHARDBROKER_CONFIG"] = self._child_config(self.config)
        env["SHARDBROKER_READY_FD"] = str(ready_w)
        base = [sys.executable, "-m", "shardbroker.process.child"]
        common = ["--run-dir", run_dir, "--shards", str(self.shards)]
        workers = [Child(f"worker {i}", base + ["worker", str(i)] + common, (ready_w,))
                   for i in range(self.shards)]
        fds = [sock.fileno() for sock in socks]  # in the order of config.effective_listeners
        acceptor = Child("acceptor", base + ["acceptor"] + common + [a for fd in fds for a in ("--listen-fd", str(fd))],
                         (ready_w, *fds))
        children = workers + [acceptor]

        def on_signal(signum: int, _frame: object) -> None:
            self._stop = True

        def on_hup(signum: int, _frame: object) -> None:
            self.request_reload()

        # A signal writes a byte to this pipe, which ends the select at once: no poll interval
        # between SIGTERM and the shutdown.
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_hup)
        log.info("shardbroker starting: %d workers, data in %s; hot path %s", self.shards, self.data_dir,
                 _compiled.state())
        for lst, sock in zip(listeners, socks, strict=True):
            h, p = sock.getsockname()[:2]
            announce.info("listening on %s:%d (%s)", h, p, lst.type)
        for child in children:
            self._start(child, env)
        node = None
        if node_class is not None and identity is not None:
            node = node_class(self.config.cluster, self.shards, self._grant_sender(admin),
                              self.data_dir, identity,
                              clients=self._client_address(listeners, socks))
            admin.owner = node.owner
            admin.cluster_status = node.status
            node.start()
        control = ThreadServer(str(self.data_dir / CONTROL_SOCKET), admin)
        control.start()
        if metrics is not None:
            metrics.start()
        sys_tree = self._sys_tree = SysPublisher(admin, self.config.server.sys_interval)
        sys_tree.start()
        announced = False
        buf = b""
        try:
            while not self._stop:
                r, _, _ = select.select([ready_r, wake_r], [], [], 0.2)
                if wake_r in r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 512)
                if ready_r in r:
                    try:
                        buf += os.read(ready_r, 4096)
                    except BlockingIOError:
                        pass
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        name = line.decode(errors="replace").removeprefix("ready ").strip()
                        for child in children:
                            if child.name == name:
                                child.ready = True
                                if node is not None:
                                    node.refresh()  # it has no grant yet
                if self._reload:
                    self._reload = False
                    log.info("SIGHUP: reloading the configuration")
                    try:
                        self.reload()
                    except ReloadError:
                        pass  # logged; the running configuration stays
                if not announced and all(c.ready for c in children):
                    announced = True
                    announce.info("ready: %d workers serving on %s:%d", self.shards, host, port)
                    self.notifier.ready(self._status())
                for child in children:
                    assert child.proc is not None
                    code = child.proc.poll()
                    if code is None or self._stop:
                        continue
                    child.ready = False
                    if code == FATAL:
                        log.error("%s failed with a fatal error: stopping the broker", child.name)
                        self.exit_code = FATAL
                        self._stop = True
                        break
                    delay = min(5.0, 0.2 * (2 ** min(child.restarts, 5))) if time.monotonic() - child.started < 5 else 0.0
                    log.warning("%s (pid %d) exited with status %d: restarting%s", child.name, child.proc.pid,
                                code, f" in {delay:.1f}s" if delay else "")
                    if delay:
                        time.sleep(delay)
                    child.restarts += 1
                    self._start(child, env)
        finally:
            self.notifier.stopping()
            sys_tree.close()
            if metrics is not None:
                metrics.close()
            control.close()
            self._shutdown(acceptor, workers)
            if node is not None:
                node.close()  # the clients are gone: leave, so that the shards move at once
            for sock in socks:
                sock.close()
            os.close(ready_r)
            os.close(ready_w)
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)
            shutil.rmtree(run_dir, ignore_errors=True)
            os.close(lock_fd)
        log.info("shardbroker stopped")
        return self.exit_code

    def _client_address(self, listeners: tuple[ListenerConfig, ...], socks: list[socket.socket]) -> str:
        """Where other nodes relay this node's clients: the ``advertise`` host (resolved
        once, here, so that a relaying acceptor needs no name lookup) and the bound port of
        the first plain ``mqtt`` listener without ``proxy_protocol``; "" (no relays to this
        node) when there is no such listener or the host does not resolve."""
        for lst, sock in zip(listeners, socks, strict=True):
            if lst.type == "mqtt" and not lst.proxy_protocol:
                port = sock.getsockname()[1]
                break
        else:
            log.warning("cluster: no plain mqtt listener without proxy_protocol: other nodes"
                        " cannot relay clients to this one (they refuse them)")
            return ""
        host = self.config.cluster.advertise.rpartition(":")[0].strip("[]")
        try:
            ip = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
        except (OSError, IndexError) as exc:
            log.warning("cluster: advertise host %s does not resolve (%s): other nodes cannot"
                        " relay clients to this one", host, exc)
            return ""
        return f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"

    @staticmethod
    def _grant_sender(admin: Admin) -> Callable[[Grant], bool]:
        """How a cluster node tells every child its grant (control op ``fence``): the workers
        first, all at once, then the acceptor, so that the acceptor hands no client to a worker
        that does not know yet it serves it; whether every child took it (one that did not is
        sent the next grant)."""
        from shardbroker.operations.admin import acceptor_socket
        from shardbroker.operations.control import ControlError, call

        def send(grant: Grant) -> bool:
            missing = admin.ask_shards({"op": "fence", "grant": grant.to_value()})["missing"]
            if missing:  # the acceptor sends nobody to a worker that does not hold the grant
                grant = grant.without({int(shard) for shard in missing})
            try:
                call(acceptor_socket(admin.run_dir), {"op": "fence", "grant": grant.to_value()})
            except ControlError:
                return False
            return not missing
        return send

    def _start(self, child: Child, env: dict[str, str]) -> None:
        child.proc = subprocess.Popen(child.argv, env=env, pass_fds=child.pass_fds, stdin=subprocess.DEVNULL)
        child.started = time.monotonic()
        log.debug("started %s (pid %d)", child.name, child.proc.pid)

    def _shutdown(self, acceptor: Child, workers: list[Child]) -> None:
        deadline = time.monotonic() + self.config.server.shutdown_timeout
        log.info("shutting down")
        for group in ([acceptor], workers):
            for child in group:
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)
            for child in group:
                if child.proc is None:
                    continue
                try:
                    child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in time: killing it", child.name)
                    child.proc.kill()
                    child.proc.wait()
