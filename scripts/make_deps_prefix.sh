#!/usr/bin/env bash
# Makes a CMake prefix with the build dependencies (Eigen, GoogleTest, Google Benchmark) out of
# Debian's packages, unpacked rather than installed, for a machine that has none of them and
# cannot reach a registry (a GPU machine for scripts/gpu_check.sh). Run it on a Debian machine
# that reaches apt (no root needed; the packages' versions are those of this machine's apt lists),
# then carry the folder along and point EFFATTN_DEPS_PREFIX at it (.devdeps/ is the default that
# gpu_check.sh picks up by itself; it is git-ignored):
#
#   bash scripts/make_deps_prefix.sh [DIR]      # default .devdeps; about 12 MB
#   cmake -S . -B build -DCMAKE_PREFIX_PATH=$PWD/.devdeps ...
#
# The prefix holds include/, lib/ and share/ of libeigen3-dev, libgtest-dev, libbenchmark-dev and
# libbenchmark1debian (the shared library the bench links; CMake's build RPATH finds it), and
# PACKAGES, the versions unpacked.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.devdeps}
packages=(libeigen3-dev libgtest-dev libbenchmark-dev libbenchmark1debian)
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  echo "make_deps_prefix.sh: needs apt-get and dpkg-deb (a Debian or Ubuntu machine)" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"  # apt's sandbox user downloads into it
if ! (cd "$tmp" && apt-get download "${packages[@]}" 2> >(grep -v unsandboxed >&2) >/dev/null); then
  echo "make_deps_prefix.sh: apt-get download failed; as root run 'apt-get update' first" >&2
  exit 1
fi
for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$tmp/root"; done
rm -rf "$dest"
mkdir -p "$dest"
cp -a "$tmp/root/usr/include" "$tmp/root/usr/lib" "$tmp/root/usr/share" "$dest/"
rm -rf "$dest/share/doc" "$dest/share/man" "$dest/share/lintian" "$dest/share/bug"
# shellcheck disable=SC2016  # dpkg-deb expands ${Package}, not the shell
for deb in "$tmp"/*.deb; do dpkg-deb -W --showformat='${Package} ${Version}\n' "$deb"; done >"$dest/PACKAGES"
echo "make_deps_prefix.sh: $(du -sh "$dest" | cut -f1) in $dest ($(paste -sd, "$dest/PACKAGES" | sed 's/,/, /g'))"
