#!/bin/sh
# Offline stand-in for Bazel's coverage tools (see ../README.md).
echo "bazel coverage needs the real @remote_coverage_tools: run it without --config=offline" >&2
exit 1
