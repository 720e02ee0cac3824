#!/usr/bin/env bash
# One-command set-up for a fresh Debian 12 machine (and a quick no-op when already done).
# Installs: GNU tar, the real scrypt, borg (>= 1.2.4, < 2), restic (>= 0.17, from Debian 13's
# package because Debian 12 ships 0.14), rclone + openssh (loopback remote-repository tests), rpm
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
for pkg in tar scrypt borgbackup rclone openssh-server openssh-client python3-venv rpm; do
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

# --- restic >= 0.17 --------------------------------------------------------------------------
restic_bin="$tools/restic/usr/bin/restic"
restic_version() { "$1" version 2>/dev/null | awk '{print $2}'; }
if [ -x "$restic_bin" ] && ver_ge "$(restic_version "$restic_bin")" "$need_restic"; then
  :
else
  say "fetching restic >= $need_restic from Debian 13 (trixie) without touching the system's sources"
  # Reuse the mirror this machine already uses for Debian, with a private list for trixie only.
  mirror=$( { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
              2>/dev/null || true; } | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ' || true)
  [ -n "$mirror" ] || die "cannot find a Debian mirror in /etc/apt/sources.list*; install restic >= $need_restic by hand into $restic_bin"
  aptdir="$tools/apt-trixie"
  mkdir -p "$aptdir/lists/partial" "$tools/restic"
  printf 'deb %s trixie main\n' "$mirror" > "$aptdir/sources.list"
  apt_opts=(-o "Dir::Etc::SourceList=$aptdir/sources.list" -o "Dir::Etc::SourceParts=-"
            -o "Dir::State::Lists=$aptdir/lists" -o "APT::Get::List-Cleanup=0")
  "${sudo_cmd[@]}" apt-get "${apt_opts[@]}" update -qq || die "apt-get update for trixie failed"
  (cd "$tools" && rm -f restic_*.deb && apt-get "${apt_opts[@]}" download restic -qq) \
    || die "apt-get download restic (trixie) failed"
  dpkg-deb -x "$(ls "$tools"/restic_*.deb | head -n1)" "$tools/restic"
  rm -f "$tools"/restic_*.deb
fi
rv=$(restic_version "$restic_bin")
ver_ge "$rv" "$need_restic" || die "restic $rv in $restic_bin; need >= $need_restic"

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

say "ok: $(tar --version | head -n1), scrypt $(dpkg-query -W -f='${Version}' scrypt), borg $borg_v, restic $rv, $("$venv/bin/python" --version)"
