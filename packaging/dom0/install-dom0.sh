#!/bin/sh
# Install qtb-pipe into dom0 from a copy of this source tree (dom0 has no pip and no network:
# copy the tree into dom0 first, see README "Install on Qubes"). Standard library only.
set -eu
src=$(cd "$(dirname "$0")/../.." && pwd)
prefix=${PREFIX:-/usr/local}
lib="$prefix/lib/qtb-pipe"
sudo mkdir -p "$lib" "$prefix/libexec/qtb-pipe"
sudo cp -r "$src/qtb_pipe" "$src/scrypt_shim" "$lib/"
printf '#!/usr/bin/python3\nimport sys\nsys.path.insert(0, "%s")\nfrom qtb_pipe.cli import main\nsys.exit(main())\n' "$lib" \
    | sudo tee "$prefix/bin/qtb-pipe" >/dev/null
sudo chmod 755 "$prefix/bin/qtb-pipe"
sudo install -m 755 "$src/packaging/dom0/notify-failure" "$prefix/libexec/qtb-pipe/notify-failure"
sudo install -m 644 "$src/packaging/dom0/qtb-pipe-backup@.service" "$src/packaging/dom0/qtb-pipe-backup@.timer" \
    /etc/systemd/system/
sudo systemctl daemon-reload
echo "installed: $prefix/bin/qtb-pipe. Next: sudo qtb-pipe init; sudo qtb-pipe install-shim;"
echo "  nightly: sudo systemctl enable --now qtb-pipe-backup@$(id -un).timer"
