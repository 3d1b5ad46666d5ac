"""`python -m neurocat.server ensure`: make sure a local Prefect server is up, start one if not."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from neurocat.cli import _server_alive

URL = os.environ.get("NEUROCAT_PREFECT_SERVER", "http://127.0.0.1:4200/api")


def ensure(timeout: float = 120.0) -> int:
    if os.environ.get("PREFECT_API_URL") or _server_alive(URL):
        print(f"Prefect server: {os.environ.get('PREFECT_API_URL') or URL} (already running)")
        return 0
    prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
    subprocess.run([prefect, "server", "start", "--background"], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _server_alive(URL):
            print(f"Prefect server started in the background; UI at {URL.removesuffix('/api')}")
            print(f"  stop it with: {prefect} server stop")
            return 0
        time.sleep(1)
    print("Prefect server did not come up; the demo falls back to an ephemeral API", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(ensure() if sys.argv[1:] == ["ensure"] else 2)
