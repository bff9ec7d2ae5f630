"""A vl-convert worker process: Vega-Lite JSON specs in on stdin, SVGs out on stdout.

`python -m telemetry_nb.analysis.svg_worker` is started by `explore.SvgRenderer`. Each request is a
4-byte big-endian length and the spec; each answer a status byte (`O` ok, `E` error), a 4-byte length
and the SVG (or the error text). It exits when its stdin closes (its parent exited), not on SIGINT.
"""

from __future__ import annotations

import signal
import sys


def serve(inp, out) -> int:
    import vl_convert as vlc

    while True:
        head = inp.read(4)
        if len(head) < 4:
            return 0
        spec = inp.read(int.from_bytes(head, "big")).decode()
        try:
            status, body = b"O", vlc.vegalite_to_svg(spec).encode()
        except Exception as err:  # noqa: BLE001 (sent back: the caller raises it)
            status, body = b"E", f"{type(err).__name__}: {err}".encode()
        out.write(status + len(body).to_bytes(4, "big") + body)
        out.flush()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C for the kernel's process group: the kernel decides
    sys.exit(serve(sys.stdin.buffer, sys.stdout.buffer))
