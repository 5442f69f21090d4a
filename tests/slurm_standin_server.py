"""A stand-in rollout server for the Slurm fleet tests: ``python slurm_standin_server.py PORT``.

Answers ``GET /health`` with 200 and ``GET /whoami`` with JSON naming the Slurm node and task it runs as,
so a test can check that the trainer reached every registered server. Exits 0 on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/health":
            body, code = b"ok", 200
        elif self.path == "/whoami":
            body = json.dumps({"node": os.environ.get("SLURMD_NODENAME"), "procid": os.environ.get("SLURM_PROCID"),
                               "het_job_id": os.environ.get("SLURM_HET_JOB_ID")}).encode()
            code = 200
        else:
            body, code = b"not found", 404
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


def main() -> int:
    server = ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler)

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
