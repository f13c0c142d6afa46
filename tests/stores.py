"""Real object-store servers on 127.0.0.1 for the checkpoint.remote tests: moto's S3 server
(`moto_server`) and the GCS emulator (`gcp-storage-emulator`, its data on disk so that a
restart keeps it). Each is a process of its own, started, stopped and restarted by the test;
the run finds it through the standard variables (AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import free_port

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # as the trainer does
SECRET = "s3cr3t-Never-Logged-7f3a"  # the S3 secret key: must appear in no file of a run
BUCKET = "runs"


class Server:
    """One store server process. `env` holds the variables a run needs to reach it."""

    kind = ""

    def __init__(self, workdir: Path, **extra_env: str):
        self.workdir, self.port = Path(workdir), free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra_env = extra_env
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def url(self, prefix: str) -> str:
        return f"{self.kind}://{BUCKET}/{prefix}"

    def start(self) -> Server:
        log = open(self.workdir / "server.log", "ab")
        env = {**os.environ, **self.extra_env}
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.kind} server exited: {(self.workdir / 'server.log').read_text()[-2000:]}"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                time.sleep(0.2)
                continue
            self.ready()
            return self
        raise RuntimeError(f"{self.kind} server did not listen on {self.port}")

    def ready(self) -> None:
        pass

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def fs(self):
        """An fsspec file system on this server, as the test's own client."""
        import fsspec

        return fsspec.filesystem(self.kind, skip_instance_cache=True, **self.client_options())

    def client_options(self) -> dict:
        raise NotImplementedError

    def objects(self, prefix: str) -> list[str]:
        fs = self.fs()
        try:
            return sorted(p[len(f"{BUCKET}/{prefix}/") :] for p in fs.find(f"{BUCKET}/{prefix}"))
        except FileNotFoundError:
            return []

    def committed(self, prefix: str) -> list[int]:
        names = [o.split("/", 1)[1] for o in self.objects(prefix) if o.startswith("checkpoints/")]
        return sorted(
            int(n[5 : -len(".manifest.json")]) for n in names if n.endswith(".manifest.json")
        )


class S3(Server):
    kind = "s3"

    @property
    def env(self) -> dict:
        return {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_ACCESS_KEY_ID": "AKIATESTRESUMABLE",
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "eu-west-1",
        }

    def client_options(self) -> dict:
        e = self.env
        return {
            "key": e["AWS_ACCESS_KEY_ID"],
            "secret": e["AWS_SECRET_ACCESS_KEY"],
            "endpoint_url": e["AWS_ENDPOINT_URL"],
            "client_kwargs": {"region_name": e["AWS_DEFAULT_REGION"]},
        }

    def command(self) -> list[str]:
        exe = shutil.which("moto_server") or os.path.join(
            os.path.dirname(sys.executable), "moto_server"
        )
        return [exe, "-H", "127.0.0.1", "-p", str(self.port)]

    def ready(self) -> None:
        if not self.extra_env:  # (an auth-enforcing server refuses every key: no bucket)
            self.fs().mkdir(BUCKET)


class GCS(Server):
    kind = "gs"

    @property
    def env(self) -> dict:
        return {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{self.port}"}

    def client_options(self) -> dict:
        return {"token": "anon", "endpoint_url": self.env["STORAGE_EMULATOR_HOST"]}

    def command(self) -> list[str]:
        exe = shutil.which("gcp-storage-emulator") or os.path.join(
            os.path.dirname(sys.executable), "gcp-storage-emulator"
        )
        return [
            exe,
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--default-bucket",
            BUCKET,
            "-q",
        ]
