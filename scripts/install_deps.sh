#!/usr/bin/env bash
# Makes sure the build dependencies are present. Run as root on a fresh Debian machine it
# installs what is missing with apt-get; otherwise it says what to install and exits 1.
# Usage: source scripts/install_deps.sh [extra Debian packages...]
effattn_install_deps() {
  local wanted=(cmake ninja-build g++ libeigen3-dev libgtest-dev libbenchmark-dev "$@")
  local missing=()
  for pkg in "${wanted[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "effattn: missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
    return 1
  fi
  echo "effattn: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
effattn_install_deps "$@"
