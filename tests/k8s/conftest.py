"""The two images, built once per test session for every container test (test_image.py and the
cross-cluster netns test)."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from chart_helpers import require
from containers import BASE, Images, build, clean_checkout, image_size_mb, podman


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Images:
    """Both images from a clean copy of the checkout with k8s/scripts/build-image.sh (podman).

    Layers, the Debian base and pip's wheel cache (a build cache mount) stay in podman's store, so
    later builds in the same run (the broken-Dockerfile test) reuse them.
    """
    require(os.geteuid() == 0, "the container tests need root")
    require(shutil.which("podman") is not None, "podman is not installed (apt-get install podman runc)")
    if BASE == "debian-local":
        require(shutil.which("mmdebstrap") is not None or podman("image", "exists", "localhost/debian-python:bookworm",
                                                                  timeout=60).returncode == 0,
                "mmdebstrap is not installed (apt-get install mmdebstrap)")
    tag = f"test-{os.getpid()}"
    context = clean_checkout(tmp_path_factory.mktemp("checkout"))
    t0 = time.monotonic()
    proc = build(context, "--image", f"localhost/telemetry-nb:{tag}")
    build_s = time.monotonic() - t0
    assert proc.returncode == 0, f"build-image.sh failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n" \
                                 f"{proc.stderr[-6000:]}"
    imgs = Images(f"localhost/telemetry-nb:{tag}", f"localhost/telemetry-nb-notebooks:{tag}", context, build_s)
    imgs.sizes_mb = {ref: image_size_mb(ref) for ref in (imgs.services, imgs.notebooks)}
    print(f"\nimages built in {build_s:.0f}s: " + ", ".join(f"{r} {s} MB" for r, s in imgs.sizes_mb.items()))
    yield imgs
    for ref in (imgs.services, imgs.notebooks):  # untag; the layers stay cached for the next run
        podman("rmi", ref, timeout=120)
