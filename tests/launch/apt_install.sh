# Sourced by tests/launch/slurm_local.sh and ssh_local.sh: `apt_install LOG PKG...` installs the
# Debian packages of PKG... that are missing (apt-get update only when a first try fails).
apt_install() {
  local logf=$1 p need=""; shift
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need="$need $p"
  done
  [ -z "$need" ] && return 0
  log "installing$need"
  apt-get install -y --no-install-recommends $need >"$logf" 2>&1 \
    || { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends $need >>"$logf" 2>&1; } \
    || { tail -5 "$logf"; log "apt-get install failed"; exit 1; }
}
