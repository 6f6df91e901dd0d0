"""``python -m services.policy_server [--backend tgi --tgi-url URL] [--http-port N] ...``

The same server as ``rlhf serve policy-server``; flags set the matching ``RLHF_POLICY_SERVER_*``
variables (a flag wins over the environment), e.g. to put a remote TGI server behind the API::

    python -m services.policy_server --backend tgi --tgi-url http://tgi:8080 --http-port 8000
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from rlhf.runtime.threads import prepare_process

prepare_process()  # before torch is imported (by the service below): see rlhf.runtime.threads

from rlhf.errors import ConfigError  # noqa: E402
from rlhf.runtime.settings import env_name  # noqa: E402
from services.policy_server.service import NAME, Settings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m services.policy_server", description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Settings):
        ap.add_argument("--" + f.name.replace("_", "-"), dest=f.name, metavar=f.name.upper(), default=None,
                        help=f"sets {env_name(NAME, f.name)}")
    args = ap.parse_args(argv)
    environ = dict(os.environ)
    for k, v in vars(args).items():
        if v is not None:
            environ[env_name(NAME, k)] = v
    from services.launch import serve_one

    try:
        serve_one(NAME, environ)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
