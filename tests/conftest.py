"""Shared fixtures: a real `redis-server` on a free port for the whole session."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from small_world import SMALL_WORLD


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(name="free_port", scope="session")
def free_port_fixture():
    """`free_port` as a fixture, for test modules (they cannot import conftest by name)."""
    return free_port


class RedisServer:
    """A throwaway redis-server (no persistence) on `port`; `start()` again after `kill()`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while not _pings(self.port):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                pytest.fail(f"redis-server exited early: {err}")
            if time.monotonic() > deadline:
                pytest.fail("redis-server did not answer PING within 10 s")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """`redis://127.0.0.1:<port>/0` of a throwaway redis-server shared by the session."""
    server = RedisServer(free_port()).start()
    yield server.url
    server.kill()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of the test's own, which the test may kill and restart."""
    server = RedisServer(free_port()).start()
    yield server
    server.kill()


# -- a tiny world, its index, and a checkpoint trained by the suite itself ---------------------


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A small generated world (corpus + question splits) on disk."""
    from training.world import WorldConfig, build_world

    out = tmp_path_factory.mktemp("world")
    build_world(out, seed=7, config=WorldConfig(seed=7, **SMALL_WORLD))
    return out


@pytest.fixture(scope="session")
def known_question(small_world) -> dict:
    """A train-split 1-hop question of the small world (the tiny checkpoint has seen it)."""
    import json

    rows = [json.loads(line) for line in (small_world / "train.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["type"] == "1hop")


@pytest.fixture(scope="session")
def small_index(small_world, tmp_path_factory):
    from retrieval.index import build_index

    return build_index(small_world / "corpus.jsonl", tmp_path_factory.mktemp("index"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A 2-layer policy trained in under a minute on oracle trajectories of the small world's
    train split (the same world `small_index` serves). Too small to learn to copy unseen names,
    it memorizes this world instead: reliable think/search/answer traces on train-split
    questions, which is what protocol tests need. Generalization is `searchagent eval`'s job."""
    from training.model import TINY_TEST
    from training.sft import SFTConfig, run_sft
    from training.world import WorldConfig

    out = tmp_path_factory.mktemp("ckpt")
    cfg = SFTConfig(
        out=out,
        world_seeds=(7,),  # = small_world
        world=WorldConfig(**SMALL_WORLD),
        per_world=300,
        size=TINY_TEST,
        copy_steps=0,
        steps=200,
        batch_size=8,
        lr=5e-3,
    )
    run_sft(cfg)
    return out


@pytest.fixture(scope="session")
def demo_artifacts():
    """artifacts/demo as `make serve` leaves it: the committed demo checkpoint plus the generated
    worlds and BM25 index, built here (about a second) when a fresh clone lacks them."""
    from pathlib import Path

    from training.demo import build_demo_data

    out = Path(__file__).resolve().parents[1] / "artifacts" / "demo"
    build_demo_data(out)
    return out


@pytest.fixture(scope="module")
def demo_app(demo_artifacts):
    """Our service app on the demo checkpoint and index (not started; see `serve_app`)."""
    from service.app import create_app
    from service.settings import Settings

    return create_app(
        Settings(
            model=demo_artifacts / "sft", index=demo_artifacts / "index", served_model_name="demo"
        )
    )


@pytest.fixture(scope="session")
def serve_cli():
    """`with serve_cli(args) as url:` runs `python -m service.cli ARGS --port P` as a real process
    until `/health` answers (failing the test with its output if it exits first); stops it after."""
    import contextlib
    import tempfile
    from pathlib import Path

    from live_server import serving_process

    @contextlib.contextmanager
    def serve(args: list[str], timeout_s: float = 120):
        with tempfile.TemporaryDirectory() as scratch:
            log = Path(scratch) / "server.log"
            with serving_process(args, free_port(), {}, log, timeout_s) as url:
                yield url

    return serve


@pytest.fixture
def serve_app():
    """`url = serve_app(app)`: `app` under a real uvicorn on a free port, stopped at teardown."""
    import contextlib

    from live_server import serving

    with contextlib.ExitStack() as started:
        yield lambda app: started.enter_context(serving(app, free_port()))


@pytest.fixture(scope="session")
def service(tiny_checkpoint, small_index):
    """A real uvicorn serving the tiny checkpoint; yields (base_url, app)."""
    from live_server import serving

    from service.app import create_app
    from service.settings import Settings

    port = free_port()
    settings = Settings(
        model=tiny_checkpoint, index=small_index, served_model_name="tiny", port=port,
        max_tokens=160,
    )  # fmt: skip
    app = create_app(settings)
    with serving(app, port) as url:
        yield url, app
