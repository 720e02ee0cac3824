#!/bin/sh
# Install qtb-adapter into a backup qube (or its template), from a copy of this source tree.
#   In a TemplateVM (recommended): sudo ./install-adapter.sh           -> /opt/qtb-adapter, /usr/local/bin
#   In the AppVM only (persists in /home): ./install-adapter.sh --user -> ~/.local/share/qtb-adapter
# The engines come from the distribution: sudo apt install restic borgbackup  (or dnf).
set -eu
src=$(cd "$(dirname "$0")/../.." && pwd)
if [ "${1:-}" = "--user" ]; then
    venv="$HOME/.local/share/qtb-adapter"; bindir="$HOME/.local/bin"
else
    venv=/opt/qtb-adapter; bindir=/usr/local/bin
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet "$src"   # pulls plumbum and humanize (through the updates proxy in a template)
mkdir -p "$bindir"
ln -sf "$venv/bin/qtb-adapter" "$bindir/qtb-adapter"
for engine in restic borg; do
    command -v "$engine" >/dev/null || echo "note: $engine is not installed (apt install restic borgbackup)"
done
echo "installed $bindir/qtb-adapter"
[ "${1:-}" = "--user" ] && echo "in dom0 set: adapter_command = \"$bindir/qtb-adapter\" in /etc/qtb-pipe/config.toml"
exit 0
