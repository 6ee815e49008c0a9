#!/usr/bin/env python3
"""Container health check without curl: exit 0 iff every URL answers HTTP 200.

    rlrt-healthcheck [URL ...]      (default: the space-separated $RLRT_HEALTH_URLS)
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(urls: list[str]) -> int:
    urls = urls or os.environ.get("RLRT_HEALTH_URLS", "").split()
    if not urls:
        print("rlrt-healthcheck: no URL given and RLRT_HEALTH_URLS is empty", file=sys.stderr)
        return 2
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback URLs
                if r.status != 200:
                    print(f"{url}: HTTP {r.status}", file=sys.stderr)
                    return 1
        except (urllib.error.URLError, OSError, ValueError) as e:
            print(f"{url}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
