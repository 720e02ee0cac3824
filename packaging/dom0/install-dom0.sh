#!/bin/sh
# Install qtb-pipe's dom0 part (driver, scrypt shim, systemd units, docs) from an unpacked release
# tarball, or remove it again. Standard library Python only; nothing is fetched. The RPM runs the
# same script into its build root. Everything installed is listed in <lib>/INSTALLED, which is what
# --uninstall removes (with the directories this installation created, when empty): dom0 is left
# as it was. The shim itself is put in place by `qtb-pipe install-shim` (and removed by
# `qtb-pipe uninstall-shim`, which --uninstall runs first).
#
#   sudo packaging/dom0/install-dom0.sh [--prefix /usr/local] [--unitdir /etc/systemd/system]
#   sudo packaging/dom0/install-dom0.sh --uninstall [--prefix /usr/local]
#   packaging/dom0/install-dom0.sh --destdir DIR --prefix /usr --unitdir /usr/lib/systemd/system  (packaging)
set -eu
src=$(cd "$(dirname "$0")/../.." && pwd)
prefix=/usr/local unitdir=/etc/systemd/system destdir="" action=install reload=yes
while [ $# -gt 0 ]; do
    case $1 in
        --prefix) prefix=$2; shift ;;
        --unitdir) unitdir=$2; shift ;;
        --destdir) destdir=$2; reload=no; shift ;;
        --uninstall) action=uninstall ;;
        --no-reload) reload=no ;;
        *) echo "install-dom0.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$destdir" ] && [ "$(id -u)" -ne 0 ]; then
    exec sudo "$0" --prefix "$prefix" --unitdir "$unitdir" $([ $action = uninstall ] && echo --uninstall)
fi
lib="$prefix/lib/qtb-pipe"
manifest="$destdir$lib/INSTALLED"

if [ $action = uninstall ]; then
    [ -f "$manifest" ] || { echo "install-dom0.sh: nothing installed at $lib" >&2; exit 1; }
    [ -z "$destdir" ] && { "$prefix/bin/qtb-pipe" uninstall-shim >/dev/null 2>&1 || true; }
    # files first, then directories deepest first (only those this installation created, if empty)
    list=$(cat "$manifest")
    find "$destdir$lib" -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true
    echo "$list" | grep '^f ' | cut -c3- | while read -r path; do rm -f "$destdir$path"; done
    echo "$list" | grep '^d ' | cut -c3- | sort -r | while read -r path; do rmdir "$destdir$path" 2>/dev/null || true; done
    [ $reload = yes ] && systemctl daemon-reload
    echo "removed qtb-pipe from $prefix"
    exit 0
fi

tmp=$(mktemp); trap 'rm -f "$tmp"' EXIT
[ -z "$destdir" ] || mkdir -p "$destdir"  # mkdirs below climbs until it finds a directory
mkdirs() {  # record each directory this installation creates
    for d in "$@"; do
        missing="" p=$d
        while [ ! -d "$destdir$p" ]; do missing="$p $missing"; p=$(dirname "$p"); done
        for m in $missing; do mkdir -m 755 "$destdir$m"; echo "d $m" >> "$tmp"; done
    done
}
put() {  # put MODE SOURCE TARGET
    install -m "$1" "$2" "$destdir$3"; echo "f $3" >> "$tmp"
}
docdir="$prefix/share/doc/qtb-pipe"
mkdirs "$lib/qtb_pipe/actions" "$lib/scrypt_shim" "$prefix/bin" "$prefix/libexec/qtb-pipe" "$unitdir" "$docdir/docs"
for f in "$src"/qtb_pipe/*.py "$src"/qtb_pipe/actions/*.py "$src"/scrypt_shim/*.py; do
    rel=${f#"$src"/}
    put 644 "$f" "$lib/$rel"
done
chmod 755 "$destdir$lib/scrypt_shim/shim.py"
# no byte-code files: what is installed stays exactly what was checked (and what --uninstall removes)
printf '#!/usr/bin/python3 -B\nimport sys\nsys.path.insert(0, "%s")\nfrom qtb_pipe.cli import main\nsys.exit(main())\n' "$lib" > "$tmp.bin"
put 755 "$tmp.bin" "$prefix/bin/qtb-pipe"; rm -f "$tmp.bin"
put 755 "$src/packaging/dom0/notify-failure" "$prefix/libexec/qtb-pipe/notify-failure"
# one service and one timer per scheduled job, from the two templates: JOB|WHEN|OnCalendar
for job in "backup|nightly|*-*-* 02:30:00" "prune|daily, after the backup|*-*-* 04:30:00" \
           "verify|weekly, a test restore of every qube and the engine's check|Sun *-*-* 05:00:00"; do
    name=${job%%|*} rest=${job#*|}; when=${rest%%|*} calendar=${rest#*|}
    for kind in service timer; do
        sed -e "s|@PREFIX@|$prefix|g" -e "s|@JOB@|$name|g" -e "s|@WHEN@|$when|g" -e "s|@CALENDAR@|$calendar|g" \
            "$src/packaging/dom0/qtb-pipe-job@.$kind.in" > "$tmp.unit"
        put 644 "$tmp.unit" "$unitdir/qtb-pipe-$name@.$kind"; rm -f "$tmp.unit"
    done
done
put 644 "$src/README.md" "$docdir/README.md"
for f in "$src"/docs/*.md; do put 644 "$f" "$docdir/docs/$(basename "$f")"; done
echo "f $lib/INSTALLED" >> "$tmp"
install -m 644 "$tmp" "$manifest"
[ $reload = yes ] && systemctl daemon-reload
echo "installed: $prefix/bin/qtb-pipe. Next: sudo qtb-pipe init; sudo qtb-pipe install-shim;"
echo "  scheduled: sudo systemctl enable --now qtb-pipe-backup@${SUDO_USER:-$(id -un)}.timer (and -prune@, -verify@)"
