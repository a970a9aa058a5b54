#!/usr/bin/env bash
# System libraries napari needs on a headless Debian/Ubuntu machine: a virtual X server (Xvfb) with
# Mesa's software OpenGL, and the xcb libraries Qt loads. Safe to run again.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
  xvfb xauth libgl1 libgl1-mesa-dri libglx-mesa0 libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 \
  libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 \
  libxcb-cursor0 libdbus-1-3 libfontconfig1 >/dev/null
echo "system dependencies installed"
