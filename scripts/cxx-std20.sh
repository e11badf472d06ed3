#!/usr/bin/env bash
# Compiler launcher used only while building Horovod 0.28.1 from source.
#
# Horovod 0.28.1 (the last release) compiles its PyTorch extension with -std=c++14/17, but the
# headers of torch >= 2.1 (2.14.1 here) require C++20. Upstream tracks this in horovod issues
# #3996 and #4014; the fix (PR #3998) is merged but unreleased. CMake calls this launcher as
# `cxx-std20.sh <compiler> <args...>`: we rewrite any -std=c++11/14/17 (and gnu++ variants) to
# -std=c++20 and run the real compiler.
set -euo pipefail
args=()
for a in "$@"; do
  case "$a" in
    -std=c++11|-std=c++14|-std=c++17) args+=("-std=c++20") ;;
    -std=gnu++11|-std=gnu++14|-std=gnu++17) args+=("-std=gnu++20") ;;
    *) args+=("$a") ;;
  esac
done
exec "${args[@]}"
