"""`python -m tests.serve_fakes`: the real `server.main()` (config, .port, uvicorn, drain) over the
fake backends, for process-level tests of the lifecycle."""

from __future__ import annotations

import sys

import server
from tests.fakes import FakeRegistry

if __name__ == "__main__":
    sys.exit(server.main(factories=FakeRegistry().factories()))
