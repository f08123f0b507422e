"""``view()``: serve a predictions folder to the browser, on this machine only unless asked."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import Any

from slidemil.config import build
from slidemil.errors import ArtifactError
from slidemil.viewer.assets import BUILD_HELP, STATIC_DIR, missing_assets
from slidemil.viewer.config import LOCALHOST, ViewerConfig

logger = logging.getLogger(__name__)
LOCAL_HOSTS = frozenset({LOCALHOST, "localhost", "::1"})
EXPOSED_WARNING = (
    "the viewer listens on {host}: anyone who can reach this machine can see the slides "
    "(patient data); prefer 127.0.0.1 and an SSH tunnel (ssh -L {port}:127.0.0.1:{port})"
)


class ViewerServer:
    """The viewer's web server on a bound socket; :meth:`serve` blocks, :meth:`start` serves
    from a background thread (notebooks, tests) until :meth:`stop`."""

    def __init__(
        self, predictions: str | Path, config: ViewerConfig, static_dir: str | Path = STATIC_DIR
    ):
        import uvicorn

        from slidemil.viewer.server import create_app

        missing = missing_assets(Path(static_dir))
        if missing:
            problem = f"viewer assets missing ({', '.join(missing)})"
            raise ArtifactError(static_dir, problem, BUILD_HELP)
        self.config = config
        # a bad folder fails here, before anything listens
        self.app = create_app(predictions, config, static_dir)
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((config.host, config.port))
        except OSError as e:
            self.socket.close()
            raise ArtifactError(
                None, f"cannot listen on {config.host}:{config.port}: {e}", "choose --port"
            ) from e
        self.port = int(self.socket.getsockname()[1])
        self._server = uvicorn.Server(
            uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.config.host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}/"

    @property
    def exposed(self) -> bool:
        return self.config.host not in LOCAL_HOSTS

    def serve(self) -> None:
        """Serve until interrupted (Ctrl-C)."""
        self._server.run(sockets=[self.socket])

    def start(self, timeout_s: float = 30.0) -> ViewerServer:
        """Serve from a daemon thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.serve, name="slidemil-viewer", daemon=True)
        self._thread.start()
        ready = threading.Event()

        def wait() -> None:
            while not self._server.started and self._thread.is_alive():
                ready.wait(0.05)

        waiter = threading.Thread(target=wait)
        waiter.start()
        waiter.join(timeout_s)
        if not self._server.started:
            raise ArtifactError(None, f"the viewer did not start within {timeout_s:.0f} s")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.socket.close()

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def view(
    predictions: str | Path,
    config: ViewerConfig | None = None,
    *,
    config_file: str | Path | None = None,
    block: bool = True,
    **options: Any,
) -> ViewerServer:
    """Serve the slides of a ``slidemil predict`` output folder with their attention.

    Opens ``predictions/predictions.csv`` and ``predictions/attention/``, binds
    ``host:port`` (127.0.0.1:8000 by default; another host logs a warning, since slides are
    patient data) and serves until interrupted. With ``block=False`` it serves from a
    background thread and returns the running server (``.url``, ``.stop()``).
    """
    config = config or build(ViewerConfig, section="view", config_file=config_file,
                             overrides=options)  # fmt: skip
    server = ViewerServer(predictions, config)
    if server.exposed:
        logger.warning(EXPOSED_WARNING.format(host=config.host, port=server.port))
    if block:
        server.serve()
        return server
    return server.start()
