#!/usr/bin/env bash
# One-command set-up for a fresh Debian 12 machine (and a quick no-op when already done).
# Installs: GNU tar, the real scrypt, borg (>= 1.2.4, < 2), restic (>= 0.17, from Debian 13's
# package because Debian 12 ships 0.14), for the tests also the oldest and newest supported engines
# besides those (restic 0.14 from Debian 12, borg 1.4 built from PyPI's borgbackup), rclone +
# openssh (loopback remote-repository tests), rpm
# (rpmbuild, for the dom0 package of `make dist`),
# and a virtualenv in .venv with the project and its Python dependencies.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
tools="$top/.tools"
venv="$top/.venv"
need_restic="0.17"

say()  { printf 'setup: %s\n' "$*"; }
die()  { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "not root and no sudo: install the system packages listed in scripts/setup.sh by hand"
  sudo_cmd=(sudo)
fi

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    say "apt-get update"
    "${sudo_cmd[@]}" apt-get update -qq || die "apt-get update failed (network? sources?)"
    apt_updated=1
  fi
  say "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "$@" \
    >/dev/null || die "apt-get install $* failed"
}

# --- system packages -------------------------------------------------------------------------
missing=()
# gcc and the -dev packages build borg 1.4 from PyPI (the tests' newest borg, below)
for pkg in tar scrypt borgbackup rclone openssh-server openssh-client python3-venv rpm \
           gcc pkg-config python3-dev libssl-dev libacl1-dev liblz4-dev libzstd-dev libxxhash-dev; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
# python3-venv is only needed when the python3 in use lacks a working venv/ensurepip.
if printf '%s\n' "${missing[@]}" | grep -qx python3-venv && python3 -c 'import ensurepip, venv' 2>/dev/null; then
  missing=("${missing[@]/python3-venv}")
fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | grep -v '^$' || true)
if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi

ver_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

borg_v=$(borg --version 2>/dev/null | awk '{print $2}')
[ -n "$borg_v" ] || die "borg not found after install"
ver_ge "$borg_v" 1.2.4 && ! ver_ge "$borg_v" 2.0 || die "borg $borg_v found; need >= 1.2.4 and < 2"
command -v scrypt >/dev/null || die "scrypt not found after install"
tar --version | head -n1 | grep -q 'GNU tar' || die "tar is not GNU tar"

# --- restic: >= 0.17 for use, and 0.14 (Debian 12's, the oldest supported) for the tests --------
restic_version() { "$1" version 2>/dev/null | awk '{print $2}'; }
# fetch_restic SUITE DEST: Debian SUITE's restic package unpacked into DEST, without touching the
# system's sources (a private apt list on the mirror this machine already uses for Debian).
fetch_restic() {
  local suite=$1 dest=$2 mirror aptdir apt_opts
  mirror=$( { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
              2>/dev/null || true; } | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ' || true)
  [ -n "$mirror" ] || die "cannot find a Debian mirror in /etc/apt/sources.list*; unpack Debian $suite's restic by hand into $dest"
  aptdir="$tools/apt-$suite"
  mkdir -p "$aptdir/lists/partial" "$dest"
  printf 'deb %s %s main\n' "$mirror" "$suite" > "$aptdir/sources.list"
  apt_opts=(-o "Dir::Etc::SourceList=$aptdir/sources.list" -o "Dir::Etc::SourceParts=-"
            -o "Dir::State::Lists=$aptdir/lists" -o "APT::Get::List-Cleanup=0")
  "${sudo_cmd[@]}" apt-get "${apt_opts[@]}" update -qq || die "apt-get update for $suite failed"
  (cd "$tools" && rm -f restic_*.deb && apt-get "${apt_opts[@]}" download restic -qq) \
    || die "apt-get download restic ($suite) failed"
  dpkg-deb -x "$(ls "$tools"/restic_*.deb | head -n1)" "$dest"
  rm -f "$tools"/restic_*.deb
}
restic_bin="$tools/restic/usr/bin/restic"
if ! { [ -x "$restic_bin" ] && ver_ge "$(restic_version "$restic_bin")" "$need_restic"; }; then
  say "fetching restic >= $need_restic from Debian 13 (trixie)"
  fetch_restic trixie "$tools/restic"
fi
rv=$(restic_version "$restic_bin")
ver_ge "$rv" "$need_restic" || die "restic $rv in $restic_bin; need >= $need_restic"
old_restic="$tools/restic-0.14/usr/bin/restic"
if ! restic_version "$old_restic" | grep -q '^0\.14\.'; then
  say "fetching restic 0.14 from Debian 12 (bookworm): the oldest supported, for the tests"
  fetch_restic bookworm "$tools/restic-0.14"
fi
restic_version "$old_restic" | grep -q '^0\.14\.' || die "no restic 0.14 in $old_restic"

# --- borg 1.4, the newest supported, for the tests (the system's 1.2.4 is the oldest) ----------
# The `borgbackup` package from PyPI, built in a virtualenv of its own (it ships no wheels; its
# build needs the -dev packages above), so the system's borg stays the one on PATH.
new_borg="$tools/borg-1.4/bin/borg"
if ! "$new_borg" --version 2>/dev/null | grep -q '^borg 1\.4\.'; then
  say "building borgbackup 1.4 from PyPI into $tools/borg-1.4 (a minute or two)"
  python3 -m venv "$tools/borg-1.4" || die "python3 -m venv failed (install python3-venv)"
  "$tools/borg-1.4/bin/pip" install -q "borgbackup>=1.4,<1.5" >"$tools/borg-1.4/pip-install.log" 2>&1 \
    || { tail -n 20 "$tools/borg-1.4/pip-install.log" >&2; die "pip install borgbackup 1.4 failed (log: $tools/borg-1.4/pip-install.log)"; }
fi
new_borg_v=$("$new_borg" --version | awk '{print $2}')

# --- virtualenv ------------------------------------------------------------------------------
stamp="$venv/.qtb-setup-stamp"
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "creating virtualenv $venv"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" || die "python3 -m venv failed (install python3-venv)"
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null || die "pip upgrade failed"
  "$venv/bin/python" -m pip install -q -e ".[dev]" >"$venv/pip-install.log" 2>&1 \
    || { tail -n 20 "$venv/pip-install.log" >&2; die "pip install -e .[dev] failed (log: $venv/pip-install.log)"; }
  echo "$want" > "$stamp"
fi
# The project's engines live next to its Python tools, so one PATH entry finds both.
ln -sf "$restic_bin" "$venv/bin/restic"
# The tests' oldest restic and newest borg, by version (tests/test_adapter_engines.py)
ln -sf "$old_restic" "$venv/bin/restic-0.14"
ln -sf "$new_borg" "$venv/bin/borg-1.4"

say "ok: $(tar --version | head -n1), scrypt $(dpkg-query -W -f='${Version}' scrypt), borg $borg_v (and $new_borg_v), restic $rv (and $(restic_version "$old_restic")), $("$venv/bin/python" --version)"
